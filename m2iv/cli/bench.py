"""``m2iv bench``: the ICL-vs-M2IV benchmark (:mod:`m2iv.bench.icl`), or with ``--engine vllm``
the vLLM serving throughput benchmark (:mod:`m2iv.vllm.bench`)."""
from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    from ..bench import icl

    from ..vllm import bench as vllm_bench

    p = subparsers.add_parser("bench", help="M2IV vs k-shot ICL: latency, throughput, memory",
                              description=icl.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    icl.add_arguments(p)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: the ICL benchmark on transformers (default); vllm: serving "
                   "throughput with per-request vectors (needs m2iv[vllm])")
    vllm_bench.add_arguments(p)
    p.set_defaults(func=lambda args: (vllm_bench.main_from_args(args) if args.engine == "vllm"
                                      else icl.main_from_args(args)) and 0)
