"""Argument types of the ``m2iv`` command: values are checked while the command line is parsed,
before any model, data or library is opened, and a bad one is argparse's usage error naming
the flag (``argument --steps: must be a positive integer; got '-3'``, exit status 2).

    p.add_argument("--steps", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--out", type=output_file(".safetensors"))

Checks that involve several arguments (``--shots`` larger than the pool) raise
:class:`m2iv.cli.errors.UsageError` in the command, still before anything heavy is loaded.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable

__all__ = ["positive_int", "non_negative_int", "finite_float", "positive_float",
           "non_negative_float", "output_file", "existing_file", "existing_dir",
           "writable_dir"]


def _int(text: str, what: str, ok: Callable[[int], bool]) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
    return value


def _float(text: str, what: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, "a positive integer", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, "an integer >= 0", lambda v: v >= 0)


def finite_float(text: str) -> float:
    """Any finite number (no nan, no inf)."""
    return _float(text, "a finite number", lambda v: True)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float(text, "a finite number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    return _float(text, "a finite number >= 0", lambda v: v >= 0)


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _dir_problem(path: str) -> str | None:
    """Why files cannot be written in directory ``path`` (None if they can)."""
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"{base} is not a directory"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{base} is not writable"
    try:  # os.access says yes to root everywhere, also on read-only or virtual file systems
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as err:
        return f"{base} is not writable ({err.strerror})"
    return None


def writable_dir(text: str) -> str:
    """A directory that exists and is writable, or can be created (its nearest existing
    ancestor is a writable directory)."""
    why = _dir_problem(text)
    if why is not None:
        raise argparse.ArgumentTypeError(f"cannot write to {text}: {why}")
    return text


def output_file(*suffixes: str) -> Callable[[str], str]:
    """The type of an output file: ends in one of ``suffixes`` (any if none given), is not a
    directory, and its directory exists and is writable or can be created."""
    def check(text: str) -> str:
        if suffixes and not text.lower().endswith(tuple(s.lower() for s in suffixes)):
            raise argparse.ArgumentTypeError(f"must be a {' or '.join(suffixes)} file; got "
                                             f"{text!r}")
        if os.path.isdir(text):
            raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
        if os.path.exists(text) and not os.access(text, os.W_OK):
            raise argparse.ArgumentTypeError(f"cannot overwrite {text}: it is not writable")
        why = _dir_problem(os.path.dirname(os.path.abspath(text)))
        if why is not None:
            raise argparse.ArgumentTypeError(f"cannot write {text}: {why}")
        return text

    check.__name__ = "output_file"  # argparse names the type in some messages
    return check


def existing_file(text: str) -> str:
    """A file that exists (and is readable)."""
    if not os.path.isfile(text):
        what = "a directory, not a file" if os.path.isdir(text) else "no such file"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not readable")
    return text


def existing_dir(text: str) -> str:
    """A directory that exists."""
    if not os.path.isdir(text):
        what = "a file, not a directory" if os.path.exists(text) else "no such directory"
        raise argparse.ArgumentTypeError(f"{text}: {what}")
    return text
