"""How the ``m2iv`` command fails: one line on stderr and an exit status, never a traceback
for a user's mistake (``m2iv --debug ...`` or ``M2IV_DEBUG=1`` shows it).

Exit statuses: 0 success; 1 an error (the package's errors, ``OSError``, a missing optional
dependency, out of memory, an unexpected exception); 2 a usage error (argparse's, or
:class:`UsageError`); 130 interrupted (Ctrl-C). Library code raises its own exceptions and never
``SystemExit``; this module is the one place that turns them into lines and statuses.

Messages of library code name Python keywords (``pass allow_incompatible=True``); the line
printed names the command's flag instead (``pass --allow-incompatible``), read from the
command's own argparse parser (:func:`flag_names`).

A long command marks what Ctrl-C should save with :func:`on_interrupt`::

    with on_interrupt(lambda: save_checkpoint() or f"checkpoint saved: {path}; add --resume"):
        train()
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import M2IVError

__all__ = ["UsageError", "EXIT_ERROR", "EXIT_USAGE", "EXIT_INTERRUPTED", "on_interrupt",
           "flag_names", "leaf_parser", "run_command", "debug_enabled"]

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_HINTS = "m2iv_hints"  # attribute of a KeyboardInterrupt: what on_interrupt hooks reported


class UsageError(M2IVError, ValueError):
    """Command-line arguments that cannot work together (exit status 2), found before any
    model or data is loaded."""


def debug_enabled(args: argparse.Namespace | None = None) -> bool:
    """``--debug`` or ``M2IV_DEBUG`` set to anything but ``""``/``0``."""
    return bool(getattr(args, "debug", False)) or os.environ.get("M2IV_DEBUG", "0") not in (
        "", "0")


@contextlib.contextmanager
def on_interrupt(save: Callable[[], str | None]) -> Iterator[None]:
    """While the block runs, Ctrl-C first calls ``save`` (e.g. writes a checkpoint; another
    Ctrl-C meanwhile is ignored), then the interrupt goes on and the ``m2iv`` command prints
    the line ``save`` returned (e.g. how to resume) below ``interrupted``."""
    try:
        yield
    except KeyboardInterrupt as err:
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
        try:
            hint = save()
        except Exception as save_err:  # noqa: BLE001 - reported, the interrupt still wins
            hint = f"saving on interrupt failed: {_one_line(save_err)}"
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, previous)
        if hint:
            hints = getattr(err, _HINTS, [])
            setattr(err, _HINTS, [*hints, hint])
        raise


def leaf_parser(parser: argparse.ArgumentParser,
                args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub-)parser of the command that ``args`` ran, e.g. ``m2iv library rm``'s."""
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                   None)
        chosen = getattr(args, sub.dest, None) if sub is not None else None
        if chosen not in getattr(sub, "choices", {}):
            return parser
        parser = sub.choices[chosen]


def flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` with the Python keywords of ``parser``'s options spelt as its flags:
    ``allow_incompatible=True`` -> ``--allow-incompatible``, ``timeout=SECONDS`` -> ``--timeout
    SECONDS``, ``num_heads=`` -> ``--num-heads``."""
    for action in parser._actions:
        if not action.option_strings or action.dest == argparse.SUPPRESS:
            continue
        flag = max(action.option_strings, key=len)
        dest = re.escape(action.dest)
        if action.nargs == 0:  # a switch: only "dest=True" has a spelling
            message = re.sub(rf"(?<![\w.-]){dest}=True\b", flag, message)
        else:
            message = re.sub(rf"(?<![\w.-]){dest}=(?=\w)", f"{flag} ", message)
            message = re.sub(rf"(?<![\w.-]){dest}=", flag, message)
    return message


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.filename}: {err.strerror}"
    return " ".join(text.split()) or type(err).__name__


def _describe(err: BaseException) -> tuple[str, int, bool]:
    """``(line, exit status, expected)``: ``expected`` is False for what looks like a bug."""
    name = type(err).__name__
    if isinstance(err, UsageError):
        return _one_line(err), EXIT_USAGE, True
    if isinstance(err, (M2IVError, OSError, ValueError)):
        return _one_line(err), EXIT_ERROR, True
    if name == "OutOfMemoryError":  # torch's (a RuntimeError): a fact of the machine
        return (f"out of memory: {_one_line(err)}; try a smaller batch or model, or another "
                "device"), EXIT_ERROR, True
    if type(err).__module__ == "sqlite3":
        return f"SQLite: {_one_line(err)}", EXIT_ERROR, True
    return f"unexpected {name}: {_one_line(err)}", EXIT_ERROR, False


def _show_warning(parser: argparse.ArgumentParser):
    def show(message, category, filename, lineno, file=None, line=None):
        text = flag_names(" ".join(str(message).split()), parser)
        print(f"{parser.prog}: warning: {text}", file=sys.stderr)
    return show


def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace,
                parser: argparse.ArgumentParser) -> int:
    """Run a command's ``func(args)`` and return its exit status; failures become one line
    (module docstring); ``--json`` commands also print ``{"error", "type"}`` on stdout."""
    leaf = leaf_parser(parser, args)
    prog, debug = leaf.prog, debug_enabled(args)
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning(leaf)
        try:
            result = func(args)
        except KeyboardInterrupt as err:
            print(f"\n{prog}: interrupted", file=sys.stderr)
            for hint in getattr(err, _HINTS, []):
                print(f"{prog}: {hint}", file=sys.stderr)
            if debug:
                traceback.print_exc()
            return EXIT_INTERRUPTED
        except Exception as err:  # noqa: BLE001 - the top level: every failure is one line
            line, status, expected = _describe(err)
            line = flag_names(line, leaf)
            if getattr(args, "json", False):
                import json

                print(json.dumps({"error": line, "type": type(err).__name__}))
            if debug:
                traceback.print_exc()
            elif not expected:
                line += " (this looks like a bug in m2iv: rerun with --debug for the traceback)"
            print(f"{prog}: error: {line}", file=sys.stderr)
            return status
    return result if isinstance(result, int) else 0
