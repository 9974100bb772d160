"""The ``m2iv`` command: ``bench``, ``train``, ``eval``, ``library``.

Each subcommand lives beside what it drives and registers itself here; importing this module
imports none of them until they are needed, so ``m2iv --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, registration function taking the subparsers object)
_SUBCOMMANDS = {
    "bench": ("m2iv.cli_bench", "add_parser"),
    "train": ("m2iv.cli_train", "add_parsers"),  # also registers "eval"
    "library": ("m2iv.cli_library", "add_parser"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2iv", description="Multimodal in-context vectors: "
                                     "benchmark, train, store and apply them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module, func in dict.fromkeys(_SUBCOMMANDS.values()):
        try:
            getattr(importlib.import_module(module), func)(sub)
        except ImportError as err:  # an optional dependency is missing: say which
            sub.add_parser(module.rsplit("_", 1)[-1], help=f"unavailable: {err}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
