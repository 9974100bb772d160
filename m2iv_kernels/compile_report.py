"""Ahead-of-time compile report for a CUDA target, without a GPU.

``python -m m2iv_kernels.info --compile sm_90`` compiles every Triton kernel at the launchers'
own configurations (the launch plans of ``triton_backend.py``, built from meta tensors) over a
table of real shapes, and the ``csrc/*.cu`` kernels with ``nvcc -Xptxas -v``, then prints per
binary: registers, spill bytes, shared memory, whether the bulk global loads and stores are
128-bit, and whether any atomic instruction is used (column sums must be deterministic).

How each column is read:
    regs, spills, smem: ``ptxas -v`` on Triton's PTX, with the ptxas Triton uses for the arch
        (``--ptxas PATH`` sets ``TRITON_PTXAS_PATH``/``TRITON_PTXAS_BLACKWELL_PATH`` for
        both); smem adds Triton's dynamic shared memory.
    ld/st 128: the widths of the PTX ``ld.global``/``st.global`` whose address derives from
        the launch's ``wide`` arguments (activations, contiguous vectors, weights), traced
        through the PTX from each kernel parameter; for ``.cu`` kernels, the SASS ``LDG``/
        ``STG`` widths of the 128-bit-pack instantiations.
    atomics: any ``atom.``/``red.`` in the PTX (SASS ``ATOM``/``RED`` for ``.cu``).

The supported range (checked by ``--check``; a CI test runs it): D <= 8192, every dtype,
mask and bank variants: no compile error, no spill, no atomic, 128-bit bulk accesses.
"""
from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ._checks import row_meta

N_SM = {80: 108, 86: 84, 89: 128, 90: 132, 100: 148}  # SMs of the reference part per arch
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
META = torch.device("meta")


@dataclass
class Case:
    """One launcher call of the table; ``launches`` are its kernel launches."""

    op: str
    d: int
    rows: int
    dtype: str
    variant: str
    launches: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.op} D={self.d} R={self.rows} {self.dtype} {self.variant}".rstrip()


def _t(*shape, dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device=META)


# (D, heads, head_dim): Llama-7B-like and 70B-like widths
SHAPES = [(4096, 32, 128), (8192, 64, 128)]
ROWS = [1, 4096]
MASKS = {"": None, "mask:bool": torch.bool, "mask:fp32": torch.float32}


# The CI subset: the widest supported row (D=8192, where registers run out first) at prefill
# and decode, every dtype, every mask and bank variant.
SUBSETS = {"ci": dict(shapes=[SHAPES[1]])}


def _meta(x, mask_dtype, bank: bool, n_bank: int = 4):
    rows = x.shape[0]
    n_seq = 4 if rows >= 4 else 1
    mask = None if mask_dtype is None else _t(rows, dtype=mask_dtype)
    index = _t(n_seq, dtype=torch.int64) if bank else None
    x3 = x.view(n_seq, rows // n_seq, x.shape[1])
    return row_meta(x3, None if mask is None else mask.view(x3.shape[:-1]), index,
                    n_bank if bank else 1)


def cases(shapes=SHAPES, rows_list=ROWS, dtypes=tuple(DTYPES), masks=tuple(MASKS),
          banks=(False, True), target=None) -> list[Case]:
    """Every launcher over the table, as launch plans on meta tensors."""
    from . import triton_backend as tb

    t = target or tb.Target(False, N_SM[90])
    out = []
    for (d, heads, hd), rows, dn, mk, bank in itertools.product(shapes, rows_list, dtypes,
                                                                masks, banks):
        dt = DTYPES[dn]
        nb = 4 if bank else 1
        x, res = _t(rows, d, dtype=dt), _t(rows, d, dtype=dt)
        meta = _meta(x, MASKS[mk], bank)
        variant = " ".join(v for v in (mk, "bank" if bank else "") if v)

        def case(op, launches, extra=""):
            out.append(Case(op, d, rows, dn, " ".join(v for v in (variant, extra) if v),
                            launches))

        heads_v, heads_g = _t(nb, heads, hd, dtype=dt), _t(nb, heads, dtype=dt)
        case("head_steer", tb.steer_fwd_plan(x, None, heads_v, heads_g, meta, None, t)[0])
        vec, gate, w = _t(nb, 1, d, dtype=dt), _t(nb, 1, dtype=dt), _t(d, dtype=dt)
        case("steer_add", tb.steer_fwd_plan(x, res, vec, gate, meta, None, t)[0])
        case("steer_add_rmsnorm", tb.rmsnorm_fwd_plan(res, x, vec, gate, w, 1e-6, 0.0, meta,
                                                      t)[0])
        case("colsum (bwd)", tb.steer_colsum_plan(x, meta, t)[0])
        y, rstd = _t(rows, d, dtype=dt), _t(rows, dtype=torch.float32)
        for need_dw, has_gr in ((True, True), (False, True), (True, False)):
            extra = ("dw" if need_dw else "") + (" +grad_res" if has_gr else "")
            case("rmsnorm_bwd", tb.rmsnorm_bwd_plan(x, res if has_gr else None, y, rstd, w, 0.0,
                                                    need_dw, meta, t)[0], extra.strip())
    return out


# --------------------------------------------------------------------------------------------
# Triton: specialize like the JIT, compile for the target, read PTX and ptxas -v

def _job(launch, backend) -> tuple[str, dict]:
    """(binary key, compile job) from a launch, specialized exactly as Triton's JIT does."""
    from triton.runtime.jit import create_function_from_signature

    k = launch.kernel
    kw = dict(launch.constexprs)
    binder = create_function_from_signature(k.signature, k.params, backend)
    bound, spec, opts = binder(*launch.args.values(), **kw)
    options, signature, constexprs, attrs = k._pack_args(backend, kw, bound, spec, opts)
    key = f"{k.__name__}|{spec}|{sorted(options.__dict__.items())}"
    runtime = [n for n, ty in signature.items() if ty != "constexpr"]
    return key, dict(module=k.fn.__module__, name=k.__name__, signature=signature,
                     constexprs=constexprs, attrs=attrs, options=options.__dict__,
                     runtime_args=runtime, wide=[a for a in launch.wide if a in runtime])


_OP = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.:]*)\s+(.*?);")
_REG = re.compile(r"%[a-z]+\d+")


def ptx_accesses(ptx: str, runtime_args: list[str]) -> tuple[dict, int]:
    """Per kernel argument, Counter of global load / store widths in bits; and the number of
    atomic instructions. Addresses are traced back to the parameter they derive from (values
    loaded from memory do not carry their address's origin)."""
    params = {}
    for m in re.finditer(r"\b(\w+)_param_(\d+)\b", ptx):
        i = int(m.group(2))
        if i < len(runtime_args):
            params[m.group(0)] = runtime_args[i]
    lines = [m.groups() for m in map(_OP.match, ptx.splitlines()) if m]
    origin: dict[str, set] = {}
    changed = True
    while changed:  # fixpoint: loops reassign registers
        changed = False
        for op, operands in lines:
            regs = _REG.findall(operands)
            if not regs or op.startswith(("st.", "ld.global", "atom.", "red.", "setp", "@")):
                continue
            dst, srcs = regs[0], regs[1:]
            new = set()
            if op.startswith("ld.param"):
                name = re.search(r"\[(\w+)\]", operands)
                if name and name.group(1) in params:
                    new = {params[name.group(1)]}
            else:
                for s in srcs:
                    new |= origin.get(s, set())
            if new - origin.get(dst, set()):
                origin.setdefault(dst, set()).update(new)
                changed = True
    acc: dict[str, dict[str, Counter]] = {}
    atomics = 0
    for op, operands in lines:
        if op.startswith(("atom.", "red.")):
            atomics += 1
        kind = "ld" if op.startswith("ld.global") else "st" if op.startswith("st.global") else None
        if kind is None:
            continue
        parts = op.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        addr = re.search(r"\[\s*(%\w+)", operands)
        for arg in origin.get(addr.group(1), {"?"}) if addr else {"?"}:
            acc.setdefault(arg, {"ld": Counter(), "st": Counter()})[kind][vec * bits] += 1
    return acc, atomics


def ptxas_info(ptx: str, arch: str, ptxas: str) -> dict:
    """Registers, spill bytes and static shared memory from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "k.ptx")
        src.write_text(ptx)
        out = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={arch}", str(src), "-o", str(Path(d, "k.cubin"))],
                             capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"ptxas failed: {out.stderr.strip()[-1500:]}")
    return _parse_ptxas(out.stderr)[-1]


def _parse_ptxas(log: str) -> list[dict]:
    """One dict per compiled function in a ``ptxas -v`` log, in order."""
    funcs = []
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            funcs.append({"function": m.group(1), "regs": 0, "spill_st": 0, "spill_ld": 0,
                          "smem": 0, "stack": 0})
        if not funcs:
            continue
        f = funcs[-1]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m:
            f["stack"], f["spill_st"], f["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            f["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            f["smem"] = int(m.group(1))
    return funcs


def _compile(job: dict, arch: int) -> dict:
    """Compile one Triton binary (in a worker process) and read it."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(job["module"]), job["name"])
    src = ASTSource(kernel, job["signature"], job["constexprs"], job["attrs"])
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job["options"])
        ptx = ck.asm["ptx"]
        info = ptxas_info(ptx, f"sm_{arch}a" if arch >= 90 else f"sm_{arch}",
                          get_ptxas(arch).path)
    except Exception as err:  # noqa: BLE001 - reported per binary
        return {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
    acc, atomics = ptx_accesses(ptx, job["runtime_args"])
    widths = {w for a in job["wide"] if a in acc for kind in ("ld", "st") for w in acc[a][kind]}
    info.update(smem=info["smem"] + ck.metadata.shared, atomics=atomics,
                wide_bits=sorted(set(widths)), num_warps=job["options"]["num_warps"],
                accesses={a: {k: dict(v) for k, v in c.items()} for a, c in acc.items()})
    return info


def compile_triton(arch: int = 90, jobs: int | None = None, progress=None,
                   table: list[Case] | None = None, **subset) -> list[dict]:
    """Compile every distinct binary of ``table`` (default: :func:`cases` of ``subset``);
    one row per binary."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction

    from . import triton_backend as tb
    from . import triton_kernels as K

    if not isinstance(K._steer_fwd_kernel, JITFunction):
        raise RuntimeError("the compile report needs compiled Triton, not its interpreter: run "
                           "it in a process without TRITON_INTERPRET=1")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binaries: dict[str, dict] = {}
    if table is None:
        table = cases(target=tb.Target(False, N_SM.get(arch, 132)), **subset)
    for case in table:
        for launch in case.launches:
            key, job = _job(launch, backend)
            entry = binaries.setdefault(key, {"job": job, "cases": []})
            entry["cases"].append(case)
    keys = list(binaries)
    workers = jobs or min(len(keys), os.cpu_count() or 1)
    results = []
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(_compile, binaries[k]["job"], arch) for k in keys]
        for i, (k, fut) in enumerate(zip(keys, futures)):
            results.append(fut.result())
            if progress:
                progress(i + 1, len(keys))
    rows = []
    for k, info in zip(keys, results):
        entry = binaries[k]
        job, first = entry["job"], entry["cases"][0]
        rows.append({"kernel": job["name"].strip("_").removesuffix("_kernel"),
                     "case": first.label, "n_cases": len(entry["cases"]),
                     "d_max": max(c.d for c in entry["cases"]), **info})
    return rows


# --------------------------------------------------------------------------------------------
# csrc/*.cu with nvcc

NVCC_FLAGS = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__",
              "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__"]  # what torch passes to nvcc for extensions


def compile_cuda(arch: int = 90, nvcc: str | None = None) -> list[dict]:
    """Compile ``csrc/*.cu`` with ``nvcc -Xptxas -v``; one row per kernel instantiation."""
    from .ext_build import source_dir

    nvcc = nvcc or shutil.which("nvcc")
    src = source_dir()
    if nvcc is None or src is None:
        raise RuntimeError("nvcc or the csrc/ sources not found")
    rows = []
    for cu in sorted(src.glob("*.cu")):
        with tempfile.TemporaryDirectory() as d:
            obj = Path(d, cu.stem + ".o")
            out = subprocess.run([nvcc, "-c", f"-arch=sm_{arch}", "-Xptxas", "-v", *NVCC_FLAGS,
                                  str(cu), "-o", str(obj)], capture_output=True, text=True)
            if out.returncode:
                rows.append({"kernel": cu.name, "case": cu.name,
                             "error": out.stderr.strip()[-300:]})
                continue
            sass = _sass_widths(obj)
        for f in _parse_ptxas(out.stderr):
            name = _demangle(f.pop("function"))
            pack = re.search(r"<[^,<>]+, (\d+)", name)  # kernel<T, VEC, ...>: VEC > 1 packs
            f.update(kernel=_short(name).split("<")[0], case=name,
                     expect_wide=bool(pack and int(pack.group(1)) > 1), **sass.get(name, {}))
            rows.append(f)
    return rows


def _demangle(name: str) -> str:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


def _cuobjdump() -> str:
    try:  # the CUDA toolkit may ship without it; Triton bundles one
        from triton import knobs
        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001
        return shutil.which("cuobjdump") or "cuobjdump"


def _sass_widths(obj: Path) -> dict[str, dict]:
    """Demangled function -> SASS global load/store widths and atomics."""
    out = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"cuobjdump failed: {out.stderr.strip()[-300:]}")
    result: dict[str, dict] = {}
    cur = None
    for line in out.stdout.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = result.setdefault(_demangle(m.group(1)), {"wide_bits": set(), "atomics": 0})
            continue
        if cur is None:
            continue
        m = re.search(r"\b(LDG|STG)\.E(?:\.(\w+))*", line)
        if m:
            width = re.search(r"\.(128|64|U16|16|U8|8)\b", line)
            cur["wide_bits"].add(int(width.group(1).lstrip("U")) if width else 32)
        if re.search(r"\b(ATOM|RED)\b", line):
            cur["atomics"] += 1
    for v in result.values():
        v["wide_bits"] = sorted(v["wide_bits"])
    return result


# --------------------------------------------------------------------------------------------
# Verdicts and printing

def problems(row: dict, d_limit: int = 8192) -> list[str]:
    """Why a binary fails the supported-range check (empty: it passes)."""
    if "error" in row:
        return [row["error"]]
    found = []
    if row.get("d_max", 0) <= d_limit and (row["spill_st"] or row["spill_ld"]):
        found.append(f"spills {row['spill_st']} B")
    if row.get("atomics"):
        found.append(f"{row['atomics']} atomic instructions")
    if row.get("expect_wide", True) and row.get("wide_bits") and max(row["wide_bits"]) < 128:
        found.append(f"no 128-bit bulk access (widths {row['wide_bits']})")
    return found


def print_rows(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    head = f"{'kernel':22s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'warps':>5s} " \
           f"{'bulk bits':>10s} {'atom':>4s}  case (number of cases sharing the binary)"
    print(head)
    print("-" * len(head))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:22s} ERROR {r['error']}")
            continue
        bits = "/".join(map(str, r.get("wide_bits", []))) or "-"
        spill = r["spill_st"]
        print(f"{r['kernel'][:22]:22s} {r['regs']:4d} {spill:5d} {r['smem']:6d} "
              f"{r.get('num_warps', '-')!s:>5s} {bits:>10s} {r.get('atomics', 0):4d}  "
              f"{_short(r['case'])}" + (f" ({r['n_cases']})" if "n_cases" in r else ""))


def _short(case: str) -> str:
    """A demangled CUDA kernel name without namespaces and parameter lists."""
    short = re.sub(r"m2iv_cuda::|\(anonymous namespace\)::|^void ", "", case)
    return re.sub(r"\([^()]*\)$", "", short)[:70]
