"""The launcher tells the truth: the rank that caused a failure is named with its exit code, signal or
traceback within seconds, bad arguments are refused before spawning, and no process outlives run()."""
import multiprocessing
import os
import signal
import socket
import time

import pytest

import parallel_workers as pw
from course.parallel import launch

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
