"""``python -m m2iv_kernels.info``: what runs here, and how the C++/CUDA extension was built.

Prints the versions (torch, triton, CUDA, Python), every backend per device with the reason
when it is unavailable, what ``backend="auto"`` picks, and where and how the extension was
built (loading it builds it first if needed). ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import platform
import sys

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    import m2iv_kernels
    from m2iv_kernels import backends

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    info: dict = {
        "m2iv_kernels": m2iv_kernels.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton") if importlib.util.find_spec("triton") else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "devices": {},
    }
    for dev in devices:
        name = "cpu" if dev.type == "cpu" else f"cuda:{dev.index}"
        entry = {"backends": backends.available_backends(dev)}
        if dev.type == "cuda":
            entry["name"] = torch.cuda.get_device_name(dev)
            entry["capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
        try:
            entry["auto"] = backends.resolve("auto", dev)
        except Exception as err:  # noqa: BLE001
            entry["auto"] = f"error: {err}"
        info["devices"][name] = entry
    from m2iv_kernels import ext

    info["extension"] = {"available": ext.UNAVAILABLE is None, "reason": ext.UNAVAILABLE,
                         **ext.BUILD}
    return info


def _print(info: dict) -> None:
    p = print
    p(f"m2iv_kernels {info['m2iv_kernels']}  python {info['python']} ({info['platform']})")
    p(f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none: CPU build'}), "
      f"triton {info['triton'] or 'not installed'}, CPU kernels {info['cpu_capability']}, "
      f"{info['threads']} threads")
    for name, entry in info["devices"].items():
        title = name + (f" ({entry['name']}, sm_{entry['capability'].replace('.', '')})"
                        if "name" in entry else "")
        p(f"\n{title}: backend='auto' -> {entry['auto']}")
        for backend, ok in entry["backends"].items():
            p(f"  {backend:7s} {'available' if ok is True else 'unavailable: ' + ok}")
    ext = info["extension"]
    p("\nC++/CUDA extension (csrc/, built by m2iv_kernels/ext_build.py)")
    if not ext["available"]:
        p(f"  unavailable: {ext['reason']}")
    if ext.get("dir"):
        p(f"  build dir   {ext['dir']}")
        p(f"  sources     {ext.get('source_dir')}: {', '.join(ext.get('sources', []))}")
        when = "built now" if ext.get("built_now") else "cached build from"
        p(f"  built       {when} {ext.get('built_at')} in {ext.get('seconds')} s with "
          f"{ext.get('compiler', '?')} for torch {ext.get('torch')}")
        p(f"  CPU         {ext.get('cpu_capability')} kernels, OpenMP "
          f"{'yes' if ext.get('openmp') else 'no'}; flags: {' '.join(ext.get('cflags', []))}")
        if ext.get("cuda"):
            rt = ext.get("cuda_runtime")
            p(f"  CUDA        yes, archs {', '.join(ext.get('cuda_archs') or [])}, runtime "
              f"{rt // 1000}.{rt % 1000 // 10}" if rt else "  CUDA        yes")
        else:
            p(f"  CUDA        no: {ext.get('cuda_reason')}")
    p("\nSwitches: M2IV_EXT=0 (disable), M2IV_EXT_CUDA=0 (CPU part only), M2IV_EXT_REBUILD=1 "
      "(retry a failed build), M2IV_CACHE_DIR, M2IV_BACKEND (force a backend)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2iv_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=1, default=str)
        print()
    else:
        _print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
