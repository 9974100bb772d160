"""The ``m2iv`` command: ``bench``, ``train``, ``eval``, ``data``, ``library``.

One module per command group (:mod:`.bench`, :mod:`.train`, :mod:`.library`), each with an
``add_parsers(subparsers)`` that registers its commands. ``m2iv --help`` and ``m2iv --version``
list the commands from :data:`COMMANDS` without importing any group (so they never import
torch); a command's own group is imported only when that command runs (or asks for its help).
Failures are one line and an exit status (:mod:`.errors`); :mod:`.args` holds the argument
types that validate values before anything is loaded.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .._version import __version__
from .errors import run_command

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
                                     "benchmark, train, store and apply them.",
                                     epilog="Errors are one line; exit status 0 success, 1 "
                                     "error, 2 usage error, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"m2iv {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: M2IV_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        module = COMMANDS[command][0]
        try:
            importlib.import_module(module).add_parsers(sub)
        except ImportError as err:  # an optional dependency is missing: say which
            why = str(err)
            if isinstance(err, ModuleNotFoundError) and err.name:
                from .._extras import install_hint

                why = f"{err.name} is not installed: {install_hint(err.name)}"
            stub = sub.add_parser(command, help=f"unavailable: {why}")
            stub.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            stub.set_defaults(func=lambda args, why=why: _unavailable(command, why))
        return parser
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def _unavailable(command: str, why: str) -> int:
    print(f"m2iv {command}: unavailable here: {why}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``m2iv`` with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_command(args.func, args, parser)
