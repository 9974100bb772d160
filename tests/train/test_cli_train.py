"""``m2iv train`` / ``eval`` / ``data`` as a user meets them: a bad flag or a task the run
cannot use is one line naming the flag, found before the model loads, with files left as they
were; Ctrl-C saves a checkpoint that ``--resume`` continues exactly; without matplotlib the loss
plot is skipped with a note; ``--help`` imports no torch and documents every option."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from m2iv import M2IV
from m2iv.cli import build_parser, main
from m2iv.cli import train as cli_train
from m2iv.cli.errors import UsageError
from m2iv.data import DataError, TaskData
from m2iv.errors import M2IVError, MissingDependencyError
from m2iv.train.checkpoint import deferred_interrupt
from m2iv.train.distill import Distiller
from tests.train.test_train import synthetic_records


def _status(argv: list[str]) -> int:
    """``m2iv ARGV``'s exit status (argparse's usage errors exit; the rest return)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: every refusal below must come before it."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(cli_train, "load_model", load_model)


def _task(tmp_path, splits=("pool", "train", "train", "eval"), n=32, name="task") -> str:
    recs = synthetic_records(n)
    for i, r in enumerate(recs):
        r["split"] = splits[i % len(splits)]
    d = tmp_path / name
    TaskData.from_items(recs, name="syn").save(d)
    return str(d)


# ---------------------------------------------------------------------- flags
@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "argument --steps: must be a positive integer; got '0'"),
    ("--steps", "-3", "argument --steps: must be a positive integer; got '-3'"),
    ("--shots", "0", "argument --shots/-k: must be a positive integer; got '0'"),
    ("--batch-size", "0", "argument --batch-size: must be a positive integer"),
    ("--grad-accum", "1.5", "argument --grad-accum: must be a positive integer"),
    ("--teacher-sets", "0", "argument --teacher-sets: must be a positive integer"),
    ("--lr", "nan", "argument --lr: must be a finite number > 0; got 'nan'"),
    ("--lr", "0", "argument --lr: must be a finite number > 0; got '0'"),
    ("--temperature", "-1", "argument --temperature: must be a finite number > 0"),
    ("--ce-weight", "-1", "argument --ce-weight: must be a finite number >= 0"),
    ("--synergy-weight", "nan", "argument --synergy-weight: must be a finite number >= 0"),
    ("--weight-decay", "inf", "argument --weight-decay: must be a finite number >= 0"),
    ("--grad-clip", "-0.5", "argument --grad-clip: must be a finite number >= 0"),
    ("--warmup", "-1", "argument --warmup: must be a finite number >= 0"),
    ("--patience", "-1", "argument --patience: must be an integer >= 0"),
    ("--out", "f.txt", "argument --out/-o: must be a .safetensors file; got 'f.txt'"),
    ("--out", "{tmp}/d.safetensors", "d.safetensors is a directory; give a file name"),
    ("--out", "{tmp}/afile/v.safetensors", "afile is not a directory"),
    ("--data", "/no/such/dir", "argument --data/-d: /no/such/dir: no such directory"),
    ("--dtype", "float64", "argument --dtype: invalid choice: 'float64'"),
    ("--plateau-decay", "1.5", "--plateau-decay 1.5 is not in (0, 1)"),
])
def test_bad_train_flags_are_one_line_before_anything_loads(tmp_path, capsys, no_model,
                                                             flag, value, message):
    data = _task(tmp_path)
    out = tmp_path / "v.safetensors"
    out.write_bytes(b"the old vectors")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "d.safetensors").mkdir()
    argv = ["train", "--data", data, "--out", str(out), flag, value.format(tmp=tmp_path)]
    assert _status(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("m2iv train: error: ") and message in err[-1], err
    assert "Traceback" not in "\n".join(err) and len(err) <= 2  # usage line + the error
    assert out.read_bytes() == b"the old vectors"
    assert sorted(os.listdir(tmp_path)) == ["afile", "d.safetensors", "task", "v.safetensors"]


@pytest.mark.parametrize("argv, message", [
    (["--vectors", "missing.safetensors"], "argument --vectors/-v: missing.safetensors: no such "
                                           "file"),
    (["--shots", "0,-1"], "argument --shots: expected comma-separated integers >= 0"),
    (["--out", "r.txt"], "argument --out/-o: must be a .json file; got 'r.txt'"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
    (["--strength", "nan"], "argument --strength: must be a finite number"),
])
def test_bad_eval_flags_are_one_line(tmp_path, capsys, no_model, argv, message):
    assert _status(["eval", "--data", _task(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


# ---------------------------------------------------------------------- the task
@pytest.mark.parametrize("splits, extra, message", [
    (("train", "eval"), [], "the task has no pool items"),
    (("pool", "eval"), [], "the task has no train items"),
    (("eval",), [], "the task has no pool and no train items"),
    (("pool", "train", "train", "train", "eval"), ["--shots", "16"],
     "--shots 16 is more than the 7 items of the demonstration pool"),
    (("pool", "train", "train", "eval"), ["--pool-size", "100"],
     "--pool-size 100 is more than the 8 items of the pool split"),
])
def test_a_task_the_run_cannot_use_is_refused_before_the_model_loads(
        tmp_path, capsys, no_model, splits, extra, message):
    data = _task(tmp_path, splits)
    out = tmp_path / "v.safetensors"
    assert _status(["train", "--data", data, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("m2iv train: error: ") and message in err[0], err
    assert not out.exists()


def test_bad_task_data_is_one_line(tmp_path, capsys, no_model):
    (tmp_path / "empty").mkdir()
    assert _status(["train", "--data", str(tmp_path / "empty"), "--out",
                    str(tmp_path / "v.safetensors")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"bad task data in {tmp_path / 'empty'}" in err[0], err


def test_model_loading_raises_the_package_errors_never_system_exit(tmp_path, capsys):
    data = _task(tmp_path)
    with pytest.raises(UsageError, match="model= is required"):
        cli_train.load_model(None, data)
    with pytest.raises(UsageError, match="unknown dtype='float64'"):
        cli_train._dtype("float64")
    with pytest.raises(M2IVError, match="cannot load model .*not a preset"):
        cli_train.load_model(str(tmp_path / "no-model"))
    with pytest.raises(DataError, match="bad task data in"):
        cli_train._load_data(str(tmp_path))
    # through the command: one line, the flag named
    argv = ["train", "--data", data, "--shots", "4", "--out", str(tmp_path / "v.safetensors")]
    assert _status(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "m2iv train: error: --model is required: a preset (testbed, testbed-1tok, testbed-4tok) "
        "or a local model directory (or a 'model' entry in the data's task.json)")
    assert _status([*argv, "--model", str(tmp_path / "no-model")]) == 1
    assert "m2iv train: error: cannot load model" in capsys.readouterr().err


# ---------------------------------------------------------------------- help
def test_help_documents_every_option_and_imports_no_torch():
    code = ("import sys\nfrom m2iv.cli import main\n"
            "for argv in (['train', '-h'], ['eval', '-h'], ['data', 'make-digits', '-h'],"
            " ['data', 'check', '-h']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "(default: None)" not in out.stdout
    processor = [ln for ln in out.stdout.splitlines() if "processor directory" in ln]
    assert len(processor) == 2 and all(ln.count("default") == 1 for ln in processor), processor

    def parsers(p):
        yield p
        for a in p._actions:
            for sub in getattr(a, "choices", None) or {}:
                if isinstance(a.choices, dict):
                    yield from parsers(a.choices[sub])
    for command in ("train", "eval", "data"):
        for p in parsers(build_parser(command)):
            for a in p._actions:
                if a.dest not in ("help", "debug", "version", "command", "data_command"):
                    assert a.help, f"{p.prog} {a.option_strings or a.dest} has no help text"


# ---------------------------------------------------------------------- runs
def _digits(tmp_path) -> str:
    from m2iv.testbed.digits_task import make_digits
    from m2iv.testbed.model import checkpoint_paths

    if not os.path.exists(checkpoint_paths("1tok")[0]):
        pytest.skip("the digits testbed checkpoint is not built yet")
    d = tmp_path / "digits"
    make_digits(d, label_map="heldout0", pool_size=32, train_size=48, eval_size=16)
    return str(d)


def _short_run(tmp_path, data) -> list[str]:
    return ["train", "--data", data, "--shots", "4", "--teacher-sets", "2", "--batch-size", "8",
            "--steps", "6", "--eval-every", "0", "--eval-queries", "16", "--backend", "torch",
            "--no-progress", "--threads", "1", "--cache-dir", str(tmp_path / "cache")]


def test_ctrl_c_saves_a_checkpoint_that_resume_continues_exactly(tmp_path, capsys,
                                                                 monkeypatch):
    data = _digits(tmp_path)
    argv = _short_run(tmp_path, data)
    ref, out = str(tmp_path / "ref.safetensors"), str(tmp_path / "v.safetensors")
    assert _status([*argv, "--out", ref]) == 0
    capsys.readouterr()

    train_step = Distiller.train_step

    def step_then_ctrl_c(self):
        rec = train_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered mid-run
        return rec
    monkeypatch.setattr(Distiller, "train_step", step_then_ctrl_c)
    assert _status([*argv, "--out", out]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["m2iv train: interrupted",
                   f"m2iv train: checkpoint of step 3 saved to {out}.ckpt; the same command "
                   "with --resume continues it"], err
    assert not os.path.exists(out) and os.path.exists(out + ".ckpt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    monkeypatch.setattr(Distiller, "train_step", train_step)
    assert _status([*argv, "--out", out, "--resume"]) == 0
    assert f"resumed from {out}.ckpt at step 3" in capsys.readouterr().err
    a, b = M2IV.load(out), M2IV.load(ref)
    for name in ("mha", "mlp", "mha_gates", "mlp_gates"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.meta["metrics"]["steps"] == 6


def test_ctrl_c_waits_for_the_update_in_progress():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the update")
    assert done == ["the rest of the update"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_matplotlib_the_loss_plot_is_skipped_with_a_note(tmp_path, capsys, monkeypatch):
    from m2iv.train.plots import plot_history

    data = _digits(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "v.safetensors"
    assert _status([*_short_run(tmp_path, data), "--steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert ("m2iv train: note: matplotlib, needed for the loss plot, is not installed: pip "
            "install 'm2iv[train]'") in err
    assert out.exists() and (tmp_path / "v.log.json").exists()
    assert not (tmp_path / "v.loss.png").exists()
    with pytest.raises(MissingDependencyError, match=r"m2iv\[train\]"):
        plot_history([{"step": 1, "loss": 1.0, "kl": 1.0}], str(tmp_path / "p.png"))
