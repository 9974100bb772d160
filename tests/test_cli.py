"""The ``m2iv`` command itself: fast help, one group imported per command."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

from m2iv import MissingDependencyError, VectorsMismatchError
from m2iv.cli import COMMANDS, main
from m2iv.cli.errors import UsageError


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys\nfrom m2iv.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'm2iv.cli.train') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in COMMANDS:
        assert name in out.stdout


def test_no_command_prints_help_and_unknown_command_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_command_loads_its_own_group(capsys):
    with pytest.raises(SystemExit):
        main(["library", "--help"])
    assert "verify" in capsys.readouterr().out


# ---------------------------------------------------------------------- failing in one line

def _run_sub(*code_lines: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "\n".join(code_lines)], capture_output=True,
                          text=True)


def test_version_and_library_help_do_not_import_torch():
    out = _run_sub("import sys", "from m2iv.cli import main",
                   "for argv in (['--version'], ['library', '-h'], ['library', 'verify', '-h']):",
                   "    try:", "        main(argv)", "    except SystemExit as e:",
                   "        assert e.code == 0, e.code",
                   "assert 'torch' not in sys.modules")
    assert out.returncode == 0, out.stderr
    from m2iv import __version__

    assert out.stdout.startswith(f"m2iv {__version__}") and "--rebuild-index" in out.stdout


def _parser_and(func, *flags):
    """A tiny command wired like the real ones: ``m2iv demo [flags]`` running ``func``."""
    import argparse

    from m2iv.cli.args import positive_int

    parser = argparse.ArgumentParser(prog="m2iv")
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("demo")
    p.add_argument("--allow-incompatible", action="store_true")
    p.add_argument("--num-heads", type=positive_int)
    p.add_argument("--timeout", type=float)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=func)
    return parser, parser.parse_args(["demo", *flags])


def _raises(err):
    def func(args):
        raise err
    return func


@pytest.mark.parametrize("err, status, line", [
    (VectorsMismatchError("does not fit: pass allow_incompatible=True"), 1,
     "m2iv demo: error: does not fit: pass --allow-incompatible"),
    (ValueError("pass model= or num_heads= and head_dim="), 1,
     "m2iv demo: error: pass model= or --num-heads and head_dim="),
    (UsageError("--shots 9 > pool of 4"), 2,
     "m2iv demo: error: --shots 9 > pool of 4"),
    (FileNotFoundError(2, "No such file or directory", "/x/y.safetensors"), 1,
     "m2iv demo: error: /x/y.safetensors: No such file or directory"),
    (PermissionError(13, "Permission denied", "/root/out"), 1,
     "m2iv demo: error: /root/out: Permission denied"),
    (MissingDependencyError("the loss plot needs matplotlib"), 1,
     "m2iv demo: error: the loss plot needs matplotlib"),
    (sqlite3.OperationalError("disk I/O error"), 1,
     "m2iv demo: error: SQLite: disk I/O error"),
])
def test_errors_are_one_line_with_an_exit_status(capsys, err, status, line):
    from m2iv.cli.errors import run_command

    parser, args = _parser_and(_raises(err))
    assert run_command(args.func, args, parser) == status
    out, errout = capsys.readouterr()
    assert errout == line + "\n" and out == ""


def test_unexpected_error_says_how_to_see_the_traceback(capsys, monkeypatch):
    from m2iv.cli.errors import run_command

    monkeypatch.delenv("M2IV_DEBUG", raising=False)
    parser, args = _parser_and(_raises(KeyError("x")))
    assert run_command(args.func, args, parser) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected KeyError" in err and "--debug" in err
    parser, args = _parser_and(_raises(KeyError("x")))
    args.debug = True
    assert run_command(args.func, args, parser) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("M2IV_DEBUG", "1")
    parser, args = _parser_and(_raises(ValueError("bad")))
    assert run_command(args.func, args, parser) == 1
    assert "Traceback" in capsys.readouterr().err


def test_json_commands_also_print_the_error_as_json(capsys):
    import json

    from m2iv.cli.errors import run_command

    parser, args = _parser_and(_raises(ValueError("pass allow_incompatible=True")), "--json")
    assert run_command(args.func, args, parser) == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "pass --allow-incompatible", "type": "ValueError"}


def test_interrupt_runs_the_hook_and_says_how_to_resume(capsys):
    import signal

    from m2iv.cli.errors import on_interrupt, run_command

    saved = []

    def train(args):
        def save():
            saved.append(signal.getsignal(signal.SIGINT))  # a 2nd Ctrl-C is ignored meanwhile
            return "checkpoint saved to v.ckpt at step 7; continue with --resume"
        with on_interrupt(save):
            raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)
    parser, args = _parser_and(train)
    assert run_command(args.func, args, parser) == 130
    err = capsys.readouterr().err
    assert saved == [signal.SIG_IGN] and signal.getsignal(signal.SIGINT) is before
    assert err.strip().splitlines() == ["m2iv demo: interrupted", "m2iv demo: checkpoint saved "
                                        "to v.ckpt at step 7; continue with --resume"]

    def broken_save(args):
        with on_interrupt(lambda: 1 / 0):
            raise KeyboardInterrupt
    parser, args = _parser_and(broken_save)
    assert run_command(args.func, args, parser) == 130
    assert "saving on interrupt failed: division by zero" in capsys.readouterr().err


def test_warnings_are_one_line(capsys):
    import warnings

    from m2iv.cli.errors import run_command

    def warn(args):
        warnings.warn("model_hint 'qwen2'\n differs", UserWarning)
        return 0
    parser, args = _parser_and(warn)
    assert run_command(args.func, args, parser) == 0
    assert capsys.readouterr().err == "m2iv demo: warning: model_hint 'qwen2' differs\n"


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "-3", "must be a positive integer; got '-3'"),
    ("--steps", "0", "must be a positive integer; got '0'"),
    ("--steps", "2.5", "must be a positive integer"),
    ("--lr", "nan", "must be a finite number > 0; got 'nan'"),
    ("--lr", "-1", "must be a finite number > 0"),
    ("--lr", "inf", "must be a finite number > 0"),
    ("--shots", "-1", "must be an integer >= 0"),
    ("--out", "f.txt", "must be a .safetensors file; got 'f.txt'"),
    ("--data", "/no/such/dir", "/no/such/dir: no such directory"),
])
def test_argument_types_refuse_before_anything_runs(capsys, flag, value, message):
    import argparse

    from m2iv.cli import args as types

    p = argparse.ArgumentParser(prog="m2iv train")
    p.add_argument("--steps", type=types.positive_int)
    p.add_argument("--lr", type=types.positive_float)
    p.add_argument("--shots", type=types.non_negative_int)
    p.add_argument("--out", type=types.output_file(".safetensors"))
    p.add_argument("--data", type=types.existing_dir)
    with pytest.raises(SystemExit) as exc:
        p.parse_args([flag, value])
    assert exc.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_output_file_checks_the_directory(tmp_path):
    import argparse

    from m2iv.cli.args import output_file, writable_dir

    check = output_file(".safetensors")
    (tmp_path / "afile").write_text("x")
    assert check(str(tmp_path / "new" / "deeper" / "v.safetensors"))  # can be created
    with pytest.raises(argparse.ArgumentTypeError, match="afile is not a directory"):
        check(str(tmp_path / "afile" / "v.safetensors"))
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        check(str(tmp_path / "d.safetensors"))
    with pytest.raises(argparse.ArgumentTypeError, match="not a directory"):
        writable_dir(str(tmp_path / "afile"))
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(argparse.ArgumentTypeError, match="not writable"):
            check(str(ro / "v.safetensors"))
    if os.path.isdir("/proc"):  # writable by os.access for root, yet no file can be made
        with pytest.raises(argparse.ArgumentTypeError, match="/proc is not writable"):
            check("/proc/m2iv/v.safetensors")


# ---------------------------------------------------------------------- optional dependencies

def test_missing_extra_names_what_to_install(monkeypatch):
    from m2iv._extras import missing, require

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingDependencyError, match=r"matplotlib, needed for the loss plot, is "
                       r"not installed: pip install 'm2iv\[train\]'"):
        require("matplotlib.pyplot", "the loss plot")
    assert "m2iv[train]" in missing("matplotlib", "the loss plot")
    assert isinstance(MissingDependencyError("x"), ImportError)
    assert require("json", "x") is __import__("json") and missing("json", "x") is None
    with pytest.raises(MissingDependencyError, match="pip install no_such_pkg_m2iv"):
        require("no_such_pkg_m2iv", "a test")


def test_missing_gguf_names_the_library_extra(monkeypatch, tmp_path):
    from m2iv.library import gguf_io

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(MissingDependencyError,
                       match=r"gguf, needed for GGUF interop.*m2iv\[library\]"):
        gguf_io.read_control_vector(tmp_path / "x.gguf")


# ---------------------------------------------------------------------- output

def test_profiler_lines_are_dropped_from_stderr(capfd):
    from m2iv.bench.common import kineto_quiet

    with kineto_quiet():
        os.write(2, b"USDT:2026-12-03 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"something else\n")
    assert capfd.readouterr().err == "something else\n"


def test_bench_peak_memory_prints_no_profiler_lines(capfd):
    import torch

    from m2iv.bench.icl import PeakMemory

    with PeakMemory(torch.device("cpu")) as peak:
        torch.ones(1000) + 1
    assert peak.peak > 0 and "USDT" not in capfd.readouterr().err
