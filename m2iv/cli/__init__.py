"""The ``m2iv`` command: ``bench``, ``train``, ``eval``, ``data``, ``library``.

One module per command group (:mod:`.bench`, :mod:`.train`, :mod:`.library`), each with an
``add_parsers(subparsers)`` that registers its commands. ``m2iv --help`` lists the commands
from :data:`COMMANDS` without importing any group (so it never imports torch); a command's own
group is imported only when that command runs (or asks for its help).
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

#: command -> (the module registering it, one-line help for ``m2iv --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("m2iv.cli.bench", "M2IV vs k-shot ICL: latency, throughput, memory"),
    "train": ("m2iv.cli.train", "distil k-shot ICL into M2IV vectors (or train a baseline)"),
    "eval": ("m2iv.cli.train", "accuracy of zero-shot, k-shot ICL, M2IVs and baselines"),
    "data": ("m2iv.cli.train", "task data: make the built-in example, validate"),
    "library": ("m2iv.cli.library", "store, find, compose and export trained vectors"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for ``command`` (its group's full parsers), or with ``None`` the top-level
    parser whose commands are one-line stubs."""
    parser = argparse.ArgumentParser(prog="m2iv", description="Multimodal in-context vectors: "
                                     "benchmark, train, store and apply them.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        module = COMMANDS[command][0]
        try:
            importlib.import_module(module).add_parsers(sub)
        except ImportError as err:  # an optional dependency is missing: say which
            sub.add_parser(command, help=f"unavailable: {err}").set_defaults(
                func=lambda args, why=str(err): _unavailable(command, why))
        return parser
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _unavailable(command: str, why: str) -> int:
    print(f"m2iv {command}: unavailable here: {why}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result = args.func(args)
    return result if isinstance(result, int) else 0
