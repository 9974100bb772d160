"""The ``m2iv`` command itself: fast help, one group imported per command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from m2iv.cli import COMMANDS, main


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
