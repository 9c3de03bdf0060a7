"""Data-parallel pieces without a process group (world size 1), bad arguments, and the torchrun entry point."""
import json
import os
import subprocess
import sys

import pytest
import torch

from course.costs import model_state_bytes
from course.model import ModelConfig, Transformer
from course.parallel.comm import Comm
from course.parallel.data_parallel import DataParallel, shard_batch
from course.parallel.experiments import Setup, build_model, reference, run
from course.parallel.zero import shard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_batch_must_split_evenly():
    x = torch.zeros(4, 3)
    assert shard_batch(torch.arange(6), 1, 3).tolist() == [2, 3]
    with pytest.raises(ValueError, match="larger than the batch"):
        shard_batch(x, 0, 8)
    with pytest.raises(ValueError, match="divisible by the world size"):
        shard_batch(x, 0, 3)
    with pytest.raises(ValueError, match="divisible by the world size"):
        Setup(batch_size=6).check(4)


def test_bad_wrapper_arguments_single_process():
    """World size 1 without a process group: the wrappers still validate and run."""
    model = Transformer(ModelConfig.gpt(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="bucket_mb"):
            DataParallel(model, Comm(), bucket_mb=bad)
    for bad in (0, 4, True, "3"):
        with pytest.raises(ValueError, match="stage must be one of"):
            shard(Transformer(model.config), Comm(), stage=bad)
    with pytest.raises(ValueError, match="stage"):
        model_state_bytes(1e9, "mixed", stage=5, world=8)
    sharded = shard(Transformer(model.config), Comm(), stage=2)
    with pytest.raises(ValueError, match="already sharded"):
        shard(sharded, Comm(), stage=3)


def test_torchrun_starts_the_same_experiment():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "course.parallel.experiments",
                          "--strategies", "bucketed,zero3", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["strategy"] for r in rows] == ["bucketed", "zero3"]  # printed by rank 0 only
    for r in rows:  # float64 runs: see tests/test_parallel_strategies.py for the bound
        assert r["world"] == 2 and r["max_abs_diff"] < 1e-9


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["naive", "bucketed", "zero1", "zero2", "zero3"])
def test_one_rank_without_process_group_equals_plain_training(name, one_thread):
    """The same code at world size 1 (collectives become local copies): a cheap check of the mechanics.
    Data parallel is exact: with one rank every reduction adds nothing and divides by 1, in the same order.
    ZeRO is exact up to the optimizer's rounding: AdamW then updates 1-D shards instead of the original
    tensors, and PyTorch's elementwise kernels take a vectorized (FMA) or a scalar path depending on a
    tensor's length and alignment, so an element's update may round differently (8.6e-16 on one Intel
    Xeon, 0 on an AMD EPYC). Bound: one float64 epsilon per operation of AdamW's update (about 10) per
    step, times the largest parameter; a wrong update (lr 1e-3) is 1e-12 times larger than that."""
    setup = Setup(steps=2, micro_batches=2, dtype="float64")
    ref = reference(setup)
    got = run(setup, name)
    assert set(got["state"]) == set(ref["state"])
    if name in ("naive", "bucketed"):
        assert all(torch.equal(got["state"][n], ref["state"][n]) for n in ref["state"]), name
        assert got["losses"] == ref["losses"]
        return
    scale = max(float(t.abs().max()) for t in ref["state"].values())
    bound = setup.steps * 10 * torch.finfo(torch.float64).eps * scale
    worst = max(float((got["state"][n] - ref["state"][n]).abs().max()) for n in ref["state"])
    assert worst <= bound, (name, worst, bound)
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-12, abs=0)  # same bound, through the loss
