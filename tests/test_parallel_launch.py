"""The launcher tells the truth: the rank that caused a failure is named with its exit code, signal or
traceback within seconds, bad arguments are refused before spawning, and no process outlives run()."""
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import parallel_workers as pw
from course.model import ModelConfig, Transformer
from course.parallel import launch
from course.parallel.comm import Comm
from course.parallel.data_parallel import BucketedDP, NaiveDP, shard_batch
from course.parallel.experiments import Setup
from course.parallel.zero import ZeRO, model_state_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DETECT_S = 10.0  # the promise: a failure is reported within 10 s of the rank's death
SLOW_START_S = 300  # run() timeouts: on an overloaded machine starting two ranks took over 60 s


def _no_children_left():
    return not multiprocessing.active_children()


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan's zombie stays when init does not reap it)."""
    if not os.path.isdir("/proc"):  # no /proc (macOS): ask the kernel; there launchd reaps orphans
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _gone(pidfile, world_size=2):
    """The grandchildren that with_grandchild started are no longer running."""
    pids = [int(open(f"{pidfile}.{r}").read()) for r in range(world_size)]
    return not any(_running(pid) for pid in pids)


def _fails(fn, *args, tmp_path, grandchild=False, timeout=SLOW_START_S):
    """Run fn(*args, stamp) on 2 ranks, expect RankFailed; return it and the seconds from the failing
    rank's stamp (written just before it failed) to the raise. Checks that no process is left."""
    stamp, pidfile = tmp_path / "stamp", str(tmp_path / "grandchild")
    wrap = (pidfile, fn) if grandchild else ()
    with pytest.raises(launch.RankFailed) as err:
        launch.run(pw.with_grandchild if grandchild else fn, 2, *wrap, *args, str(stamp), timeout=timeout, threads=1)
    latency = time.time() - float(stamp.read_text())
    assert _no_children_left()
    assert not grandchild or _gone(pidfile)
    return err.value, latency


def test_raising_rank_is_named_with_its_traceback(tmp_path):
    err, latency = _fails(pw.fail_on, 1, "boom", tmp_path=tmp_path, grandchild=True)
    assert err.rank == 1 and err.exitcode is None and err.signal is None
    assert str(err).startswith("rank 1 raised RuntimeError: boom on rank 1\nTraceback")
    assert 'raise RuntimeError(f"{message} on rank {rank}")' in str(err)
    assert "also failed (later, or as a consequence):\n  rank 0 raised RuntimeError:" in str(err)  # the survivor
    assert latency <= DETECT_S


@pytest.mark.parametrize("rank", [1, 0, 1])  # repeated: the survivor's gloo error races the death
def test_killed_rank_is_blamed_not_the_survivor(rank, tmp_path):
    err, latency = _fails(pw.die_by_signal, rank, signal.SIGKILL, tmp_path=tmp_path, grandchild=True)
    assert (err.rank, err.signal, err.exitcode) == (rank, signal.SIGKILL, -signal.SIGKILL)
    assert str(err).startswith(f"rank {rank} was killed by signal SIGKILL")
    assert latency <= DETECT_S


@pytest.mark.parametrize("fn, sig, fatal", [(pw.segfault, signal.SIGSEGV, "Segmentation fault"),
                                            (pw.abort, signal.SIGABRT, "Aborted")])
def test_crashed_rank_is_named_with_its_signal_and_python_stack(fn, sig, fatal, tmp_path):
    err, latency = _fails(fn, 0, tmp_path=tmp_path)
    assert (err.rank, err.signal, err.exitcode) == (0, sig, -sig)
    assert str(err).startswith(f"rank 0 was killed by signal {sig.name}")
    assert f"Fatal Python error: {fatal}" in str(err) and f"in {fn.__name__}" in str(err)  # faulthandler's stack
    assert latency <= DETECT_S


@pytest.mark.parametrize("code, peers", [(3, "collective"), (0, "sleep")])
def test_rank_that_exits_without_a_result_fails_at_once(code, peers, tmp_path):
    err, latency = _fails(pw.exit_without_result, 1, code, peers, tmp_path=tmp_path)
    assert (err.rank, err.exitcode, err.signal) == (1, code, None)
    assert str(err).startswith(f"rank 1 exited with code {code} without reporting a result")
    assert latency <= DETECT_S  # not the timeout (with peers="sleep" nothing but the exit ends the run)


def test_successful_run_returns_values_and_leaves_nothing_running(tmp_path):
    before, pidfile = os.environ.get("OMP_NUM_THREADS"), str(tmp_path / "grandchild")
    res = launch.run(pw.with_grandchild, 2, pidfile, pw.rank_and_threads, timeout=SLOW_START_S, threads=1)
    assert res.values == [(0, 1, "1"), (1, 1, "1")]  # rank, torch threads, OMP_NUM_THREADS per rank
    assert os.environ.get("OMP_NUM_THREADS") == before
    assert _no_children_left() and _gone(pidfile)  # the ranks returned; what they started was ended


def test_timeout_stops_every_rank():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"timeout=2.0 s \(ranks \[0, 1\] had not reported\)"):
        launch.run(pw.sleep_forever, 2, timeout=2, threads=1)  # the ranks may still be starting: stopped anyway
    assert time.monotonic() - start < 2 + DETECT_S
    assert _no_children_left()


def test_port_already_taken_is_refused_before_spawning():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"port={port} is already taken"):
            launch.run(pw.fail_on, 2, 0, timeout=10, port=port)
    assert _no_children_left()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(fn=lambda: None), ValueError, "importable module"),
    (dict(fn=42), TypeError, "fn must be a function, got 42"),
    (dict(world_size=0), ValueError, "world_size must be a positive integer .*, got 0"),
    (dict(world_size=True), TypeError, "world_size must be .*, got True of type bool"),
    (dict(world_size=2.0), TypeError, "world_size must be .*, got 2.0 of type float"),
    (dict(timeout=float("inf")), ValueError, "timeout must be a finite number of seconds > 0, got inf"),
    (dict(timeout=float("nan")), ValueError, "timeout must be a finite .*, got nan"),
    (dict(timeout=0), ValueError, "timeout must be a finite .*, got 0"),
    (dict(timeout=-1), ValueError, "timeout must be a finite .*, got -1"),
    (dict(timeout="10"), TypeError, "timeout must be a finite number of seconds > 0, got '10' of type str"),
    (dict(timeout=True), TypeError, "timeout must be .*, got True of type bool"),
    (dict(threads=-1), ValueError, r"threads must be None \(cores // world_size\) or a positive integer, got -1"),
    (dict(threads=0), ValueError, "threads must be .*, got 0"),
    (dict(threads=1.5), TypeError, "threads must be .*, got 1.5 of type float"),
    (dict(port=70000), ValueError, "port must be an integer in 1..65535"),
])
def test_bad_launch_arguments_are_refused_before_spawning(kwargs, error, message):
    call = dict(fn=pw.sleep_forever, world_size=2, timeout=5)  # spawned, it would end in TimeoutError instead
    call.update(kwargs)
    with pytest.raises(error, match=message):
        launch.run(call.pop("fn"), call.pop("world_size"), **call)
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
