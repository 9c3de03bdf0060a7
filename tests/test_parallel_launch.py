"""The launcher: errors end the run with the failing rank's traceback, no process outlives run()."""
import multiprocessing
import os
import socket
import subprocess
import sys
import json
import time

import pytest
import torch

from course.model import ModelConfig, Transformer
from course.parallel import launch
from course.parallel.comm import Comm
from course.parallel.data_parallel import BucketedDP, NaiveDP, shard_batch
from course.parallel.experiments import Setup, fail_on, sleep_forever
from course.parallel.zero import ZeRO, model_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_children_left():
    return not multiprocessing.active_children()


def test_failing_rank_ends_run_with_its_traceback():
    start = time.monotonic()
    with pytest.raises(launch.RankFailed) as err:
        launch.run(fail_on, 2, 1, "boom", timeout=60)
    assert err.value.rank == 1
    assert "RuntimeError: boom on rank 1" in str(err.value) and "Traceback" in str(err.value)
    assert time.monotonic() - start < 60  # rank 0 was blocked in a collective and got stopped
    assert _no_children_left()


def test_timeout_stops_every_rank():
    with pytest.raises(TimeoutError, match="timeout=8"):
        launch.run(sleep_forever, 2, timeout=8)
    assert _no_children_left()


def test_port_already_taken_is_refused_before_spawning():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"port={port} is already taken"):
            launch.run(fail_on, 2, 0, timeout=10, port=port)
    assert _no_children_left()


def test_bad_launch_arguments():
    with pytest.raises(ValueError, match="importable module"):
        launch.run(lambda: None, 2)
    with pytest.raises(ValueError, match="world_size"):
        launch.run(fail_on, 0)
    with pytest.raises(ValueError, match="port"):
        launch.run(fail_on, 2, port=70000)
    assert _no_children_left()


def test_batch_must_split_evenly():
    x = torch.zeros(4, 3)
    assert shard_batch(torch.arange(6), 1, 3).tolist() == [2, 3]
    with pytest.raises(ValueError, match="larger than the batch"):
        shard_batch(x, 0, 8)
    with pytest.raises(ValueError, match="divisible by the world size"):
        shard_batch(x, 0, 3)
    with pytest.raises(ValueError, match="divisible by the world size"):
        Setup(batch_size=6).check(4)


def test_bad_strategy_arguments_single_process():
    """World size 1 without a process group: the strategies still validate and run."""
    model = Transformer(ModelConfig.gpt(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    with pytest.raises(ValueError, match="bucket_mb"):
        BucketedDP(model, Comm(), bucket_mb=0)
    with pytest.raises(ValueError, match="bucket_mb"):
        BucketedDP(model, Comm(), bucket_mb=-1.0)
    with pytest.raises(ValueError, match="stage must be one of"):
        ZeRO(model, Comm(), stage=4)
    with pytest.raises(ValueError, match="stage"):
        model_state_bytes(1e9, 8, stage=5)


def test_torchrun_starts_the_same_experiment():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "-m", "course.parallel.experiments",
                          "--strategies", "bucketed,zero3", "--steps", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["strategy"] for r in rows] == ["bucketed", "zero3"]  # printed by rank 0 only
    for r in rows:
        assert r["world"] == 2 and r["max_abs_diff"] < 1e-5


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP spin contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["naive", "bucketed", "zero1", "zero2", "zero3"])
def test_one_rank_without_process_group_equals_plain_training(name, one_thread):
    """The same code at world size 1 (collectives become local copies): a cheap check of the mechanics."""
    from course.parallel.data_parallel import train_step
    from course.parallel.experiments import build_model, global_batch, make_strategy, reference

    setup = Setup(steps=2, micro_batches=2)
    ref_state, ref_losses, _ = reference(setup)
    strat = make_strategy(name, build_model(setup), Comm(), setup)
    for step in range(setup.steps):
        x, y = global_batch(setup, step)
        train_step(strat, list(zip(x.chunk(2), y.chunk(2))))
    state = strat.full_state_dict()
    assert set(state) == set(ref_state)
    assert max((state[n] - ref_state[n]).abs().max().item() for n in state) < 1e-5
