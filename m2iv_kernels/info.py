"""``python -m m2iv_kernels.info``: what runs here, and how the C++/CUDA extension was built.

Prints the versions (torch, triton, CUDA, Python), every backend per device with the reason
when it is unavailable, what ``backend="auto"`` picks, and where and how the extension was
built (loading it builds it first if needed). ``--json`` prints the same as one JSON object.

``--compile sm_90`` instead compiles every kernel ahead of time for that CUDA target, no GPU
needed (``compile_report.py``), and prints registers, spills, shared memory and access widths;
with ``--check`` it exits 1 on a compile error, a spill in the supported range, an atomic or
a narrow bulk access.
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


def _compile_report(args) -> int:
    """``--compile sm_XX``: the ahead-of-time compile report (``compile_report.py``)."""
    import os
    import time

    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)  # compile for the target, not the interpreter
        if args.ptxas:
            os.environ["TRITON_PTXAS_PATH"] = os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = \
                args.ptxas
    from m2iv_kernels import compile_report as cr

    arch = int(args.compile.lower().removeprefix("sm_").rstrip("a"))
    table = {} if args.table == "full" else cr.SUBSETS[args.table]
    t0 = time.perf_counter()

    def progress(done, total):
        if sys.stderr.isatty() or done == total:
            print(f"\rcompiled {done}/{total} Triton binaries", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    triton_rows = cr.compile_triton(arch, jobs=args.jobs, progress=progress, **table)
    cuda_rows = cr.compile_cuda(arch) if not args.no_cu else []
    rows = triton_rows + cuda_rows
    bad = [(r, p) for r in rows for p in [cr.problems(r)] if p]
    if args.json:
        json.dump({"arch": f"sm_{arch}", "table": args.table, "triton": triton_rows,
                   "cuda": cuda_rows, "problems": [{"kernel": r["kernel"], "case": r["case"],
                                                    "problems": p} for r, p in bad]},
                  sys.stdout, indent=1, default=str)
        print()
    else:
        cr.print_rows(triton_rows, f"Triton kernels for sm_{arch} ({args.table} table, "
                                   f"{len(triton_rows)} distinct binaries)")
        if cuda_rows:
            cr.print_rows(cuda_rows, f"csrc/*.cu for sm_{arch} (nvcc -Xptxas -v)")
        print(f"\n{len(rows)} binaries in {time.perf_counter() - t0:.0f} s; "
              + (f"{len(bad)} outside the supported range's rules:" if bad else
                 "no compile error, spill, atomic or narrow bulk access"))
        for r, p in bad:
            print(f"  {r['kernel']}: {'; '.join(p)}  [{r['case']}]")
    return 1 if bad and args.check else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m m2iv_kernels.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--compile", metavar="sm_XX", help="compile every kernel ahead of time "
                        "for this CUDA target (no GPU needed) and report registers, spills, "
                        "shared memory and access widths")
    parser.add_argument("--table", default="full", choices=["full", "ci"],
                        help="with --compile: the full shape table or the CI subset")
    parser.add_argument("--check", action="store_true", help="with --compile: exit 1 on any "
                        "compile error, spill (D <= 8192), atomic or narrow bulk access")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes")
    parser.add_argument("--ptxas", default=None, help="with --compile: the ptxas Triton uses "
                        "(e.g. the CUDA toolkit's, if Triton's bundled one rejects its PTX)")
    parser.add_argument("--no-cu", action="store_true", help="skip csrc/*.cu")
    args = parser.parse_args(argv)
    if args.compile:
        return _compile_report(args)
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=1, default=str)
        print()
    else:
        _print(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
