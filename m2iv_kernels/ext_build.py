"""Just-in-time build of the C++/CUDA extension (``csrc/``), cached on disk.

:func:`load` returns the extension module, building it first when no cached build matches
(``torch.utils.cpp_extension.load`` with ninja; one line on stderr while it compiles), or
raises :class:`Unavailable` with a one-line reason. :data:`BUILD` describes the loaded build
(``python -m m2iv_kernels.info`` prints it).

Environment:
    ``M2IV_EXT=0``          do not build or load the extension.
    ``M2IV_EXT_CUDA=0``     build the CPU part only, even where CUDA could be built.
    ``M2IV_EXT_REBUILD=1``  ignore a cached build failure and try again.
    ``M2IV_EXT_STREAM=0``   no streaming (non-temporal) stores for large CPU outputs.
    ``M2IV_CACHE_DIR``      cache directory (default ``$TORCH_EXTENSIONS_DIR/m2iv`` if that is
                            set, else ``$XDG_CACHE_HOME/m2iv/ext`` or ``~/.cache/m2iv/ext``).
    ``ATEN_CPU_CAPABILITY`` (PyTorch's own) caps the CPU instruction set, as for torch itself.

A build is keyed by a hash of the sources and flags, the torch and Python versions, the CPU
instruction set torch uses here (AVX512 / AVX2 / default) and, for CUDA, the GPU
architectures, so changing any of them builds afresh beside the old one. The CPU code is
compiled for the instruction set that torch's own kernels use on this machine (``-mavx512*``
or ``-mavx2``), not ``-march=native``, so a cache shared by similar machines stays valid.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

MODULE_NAME = "m2iv_ext"
CPU_SOURCES = ("m2iv_bind.cpp", "m2iv_cpu.cpp")
CUDA_SOURCES = ("m2iv_cuda.cu", "m2iv_cuda_bind.cpp")
HEADERS = ("m2iv_ext.h", "m2iv_cuda.h")
BUILD_MESSAGE = "m2iv_kernels: building the C++ extension (once, ~1 min)..."
_FALSE = ("0", "false", "no", "off")

BUILD: dict = {}  # how the loaded extension was built (``python -m m2iv_kernels.info``)


class Unavailable(Exception):
    """The extension cannot be used; the message says why, in one line."""


# --------------------------------------------------------------------------------------------
# Where things are

def source_dir() -> Path | None:
    """The csrc sources: shipped in the package (``_csrc``), or the repository's ``csrc/``."""
    here = Path(__file__).resolve().parent
    for d in (here / "_csrc", here.parent / "csrc"):
        if all((d / f).is_file() for f in CPU_SOURCES + HEADERS[:1]):
            return d
    return None


def cache_root() -> Path:
    if os.environ.get("M2IV_CACHE_DIR"):
        return Path(os.environ["M2IV_CACHE_DIR"]).expanduser()
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "m2iv"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "m2iv" / "ext"


# --------------------------------------------------------------------------------------------
# Build plan

def cpu_flags() -> tuple[str, list[str]]:
    """(instruction set, compiler flags) for the CPU kernels: the one torch uses here."""
    cap = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64"):
        if cap == "AVX512":
            return cap, ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
                         "-mf16c", "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
        if cap == "AVX2":
            return cap, ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2",
                         "-DCPU_CAPABILITY_AVX2"]
    # other CPUs: at::vec's portable code (NEON on aarch64)
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def _common_flags() -> tuple[list[str], list[str]]:
    cflags = ["-O3", "-fvisibility=hidden", "-fno-math-errno", "-fno-trapping-math"]
    ldflags: list[str] = []
    if sys.platform.startswith("linux"):  # at::parallel_for is OpenMP in torch's Linux builds
        cflags.append("-fopenmp")
        ldflags.append("-fopenmp")
    return cflags, ldflags


def _cuda_plan() -> tuple[list[str] | None, str | None]:
    """(GPU architectures to build for, None) or (None, why the CUDA part is not built)."""
    if os.environ.get("M2IV_EXT_CUDA", "1").lower() in _FALSE:
        return None, "disabled by M2IV_EXT_CUDA=0"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = Path(CUDA_HOME or "", "bin", "nvcc")
    if not CUDA_HOME or not nvcc.exists():
        return None, "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs.replace(";", " ").split(), None
    if not torch.cuda.is_available():
        return None, "no GPU visible to pick an architecture (set TORCH_CUDA_ARCH_LIST)"
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"{a}.{b}" for a, b in caps], None


def _plan(src: Path, cuda_archs: list[str] | None) -> dict:
    cap, isa = cpu_flags()
    cflags, ldflags = _common_flags()
    cflags = cflags + isa
    cuda_cflags: list[str] = []
    sources = list(CPU_SOURCES)
    if cuda_archs is not None:
        cflags.append("-DM2IV_WITH_CUDA")
        sources += CUDA_SOURCES
        cuda_cflags = ["-O3", "-DM2IV_WITH_CUDA"]  # -std: torch's choice
    h = hashlib.sha256()
    for name in sorted(set(sources) | set(HEADERS)):
        h.update(name.encode() + b"\0" + (src / name).read_bytes() + b"\0")
    h.update(json.dumps([torch.__version__, torch.version.cuda, sys.version_info[:2],
                         platform.machine(), cflags, cuda_cflags, ldflags, cuda_archs]).encode())
    tag = (f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}"
           f"{sys.version_info[1]}-{cap.lower()}" + ("-cuda" if cuda_archs is not None else ""))
    return {"dir": str(cache_root() / f"{tag}-{h.hexdigest()[:12]}"), "sources": sources,
            "source_dir": str(src), "cflags": cflags, "cuda_cflags": cuda_cflags,
            "ldflags": ldflags, "cpu_capability": cap, "cuda_archs": cuda_archs}


# --------------------------------------------------------------------------------------------
# Build and load

def _library(d: Path) -> Path | None:
    for suffix in (".so", ".pyd"):
        p = d / f"{MODULE_NAME}{suffix}"
        if p.is_file():
            return p
    return None


def _import(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines[1:]:  # the compiler's first error says more than ninja's summary
        if "error:" in ln.lower() or "error " in ln.lower()[:12]:
            return ln[:300]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _build(plan: dict) -> ModuleType:
    from torch.utils import cpp_extension

    d = Path(plan["dir"])
    d.mkdir(parents=True, exist_ok=True)
    lock = d / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > 600:
        lock.unlink(missing_ok=True)  # left by a build that was killed
    msg = BUILD_MESSAGE
    if plan["cuda_archs"] is not None:
        msg = msg.replace("C++ extension", "C++/CUDA extension").replace("~1 min", "~2 min")
    print(msg, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    src = Path(plan["source_dir"])
    env_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if plan["cuda_archs"] is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(plan["cuda_archs"])
    try:
        module = cpp_extension.load(
            name=MODULE_NAME, sources=[str(src / s) for s in plan["sources"]],
            extra_cflags=plan["cflags"], extra_cuda_cflags=plan["cuda_cflags"],
            extra_ldflags=plan["ldflags"], extra_include_paths=[str(src)],
            build_directory=str(d), with_cuda=plan["cuda_archs"] is not None, verbose=False)
    finally:
        if plan["cuda_archs"] is not None:
            if env_archs is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = env_archs
    info = dict(plan, seconds=round(time.perf_counter() - t0, 1),
                built_at=time.strftime("%Y-%m-%d %H:%M:%S"), torch=torch.__version__,
                python=platform.python_version())
    (d / "build.json").write_text(json.dumps(info, indent=1))
    return module


def _load_plan(plan: dict) -> ModuleType:
    """Load the cached build of ``plan``, building it if needed; raise Unavailable."""
    d = Path(plan["dir"])
    lib, done, failed = _library(d), d / "build.json", d / "FAILED"
    if lib is not None and done.is_file():
        BUILD.update(json.loads(done.read_text()), built_now=False)
        return _import(lib)
    if failed.is_file() and os.environ.get("M2IV_EXT_REBUILD", "0").lower() in _FALSE:
        raise Unavailable(f"{failed.read_text().strip()} (cached failure: set "
                           f"M2IV_EXT_REBUILD=1 or delete {d} to retry)")
    try:
        module = _build(plan)
    except Exception as err:  # noqa: BLE001 - any failure means "unavailable, here is why"
        reason = f"build failed: {_first_line(err)}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            failed.write_text(reason + "\n")
            (d / "build_error.log").write_text(str(err))
        except OSError:
            pass
        raise Unavailable(f"{reason} (full log: {d / 'build_error.log'})") from err
    failed.unlink(missing_ok=True)
    BUILD.update(json.loads(done.read_text()), built_now=True)
    return module


def _load() -> ModuleType:
    if os.environ.get("M2IV_EXT", "1").lower() in _FALSE:
        raise Unavailable("disabled by M2IV_EXT=0 (unset it to build and use the C++ "
                           "extension)")
    src = source_dir()
    if src is None:
        raise Unavailable("the csrc/ sources are not installed next to m2iv_kernels")
    archs, cuda_reason = _cuda_plan()
    if archs is not None:
        try:
            return _load_plan(_plan(src, archs))
        except Unavailable as err:  # fall back to a CPU-only build
            cuda_reason = f"the CUDA build failed: {err}"
    module = _load_plan(_plan(src, None))
    BUILD["cuda_reason"] = cuda_reason
    return module


_LOADED: list = []  # [module] or [reason]: loaded once per process


def load() -> ModuleType:
    """The extension module (built first if needed); raises :class:`Unavailable`."""
    if not _LOADED:
        try:
            module = _load()
            BUILD.update(module.build_info())
            _LOADED.append(module)
        except Unavailable as err:
            _LOADED.append(str(err))
        except Exception as err:  # noqa: BLE001 - never break ``import m2iv_kernels``
            _LOADED.append(f"could not load the extension: {_first_line(err)}")
    if isinstance(_LOADED[0], str):
        raise Unavailable(_LOADED[0])
    return _LOADED[0]
