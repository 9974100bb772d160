"""``m2iv bench``: the ICL-vs-M2IV benchmark (:mod:`m2iv.bench.icl`)."""
from __future__ import annotations

import argparse


def add_parsers(subparsers) -> None:
    from ..bench import icl

    p = subparsers.add_parser("bench", help="M2IV vs k-shot ICL: latency, throughput, memory",
                              description=icl.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    icl.add_arguments(p)
    p.set_defaults(func=lambda args: icl.main_from_args(args) and 0)
