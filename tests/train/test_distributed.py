"""Data-parallel distillation: 2 CPU processes (gloo) match one process.

Both runs see the same global batches (sampling is a pure function of the seed and the step);
each rank takes a contiguous half of every micro-batch, and the vector gradients are summed
with ``all_reduce``, so the results agree up to float summation order.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from m2iv import M2IV

STEPS = 4


def _config(**kw):
    from m2iv.train import TrainConfig

    base = dict(shots=2, steps=STEPS, batch_size=6, grad_accum=2, eval_every=2,
                eval_queries=12, progress=False, backend="torch", ce_weight=0.5, lr=0.05)
    base.update(kw)
    return TrainConfig(**base)


def _setup(data_dir):
    from m2iv.prompts import make_prompt_builder
    from m2iv.testing import build_offline_processor
    from tests.train.test_train import sharp_model

    model = sharp_model("llava")
    return model, make_prompt_builder(model, build_offline_processor(model))


def _worker(rank, world, init_file, data_dir, out):
    from m2iv.train import Distiller
    from m2iv.train.distributed import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    ctx = DistContext(rank, world, owns_group=True)
    try:
        model, b = _setup(data_dir)
        d = Distiller(model, data_dir, b, _config(), dist=ctx)
        res = d.train()
        d.close()
        if rank == 0:
            res.vectors.save(out)
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from m2iv.data import TaskData
    from tests.train.test_train import synthetic_records

    d = tmp_path_factory.mktemp("dist_task")
    TaskData.from_items(synthetic_records(96), name="synthetic").save(d)
    return str(d)


def test_two_processes_match_single(data_dir, tmp_path):
    from m2iv.train import Distiller

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, b = _setup(data_dir)
        d = Distiller(model, data_dir, b, _config())
        single = d.train()
        d.close()
    finally:
        torch.set_num_threads(n)
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), data_dir, out), nprocs=2, join=True)
    ddp = M2IV.load(out)
    for name in ("mha", "mha_gates", "mlp", "mlp_gates"):
        torch.testing.assert_close(getattr(ddp, name), getattr(single.vectors, name),
                                   rtol=1e-4, atol=1e-6)
    for key in ("eval_kl", "zero_kl"):
        assert ddp.meta["metrics"][key] == pytest.approx(single.metrics[key], rel=1e-4)
    assert ddp.meta["metrics"]["world_size"] == 2
    # the run did train: the vectors moved and the KL dropped
    assert single.metrics["eval_kl"] < single.metrics["zero_kl"]


def test_torchrun_cli(tmp_path):
    """``torchrun --nproc_per_node 2 -m m2iv.cli train`` on the built-in digits task."""
    from m2iv.testbed.model import checkpoint_paths

    if not os.path.exists(checkpoint_paths("1tok")[0]):
        pytest.skip("the digits testbed checkpoint is not built yet")
    from m2iv.testbed.digits_task import make_digits

    data = str(tmp_path / "digits")
    make_digits(data, pool_size=40, train_size=32, eval_size=16)
    out = str(tmp_path / "v.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "m2iv.cli", "train", "--data", data, "--shots", "4", "--steps", "3",
           "--batch-size", "4", "--eval-every", "0", "--eval-queries", "16", "--backend",
           "torch", "--no-progress", "--threads", "1", "--out", out]
    # run from outside the repository, as a user does (no folder of it on sys.path)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    v = M2IV.load(out)
    assert v.meta["metrics"]["world_size"] == 2 and v.meta["metrics"]["steps"] == 3
