"""Worker functions for the launcher tests: each fails in one way on one rank while the others wait.

They live in a module (not in the test file) because spawned ranks import them by name; pytest puts
tests/ on sys.path and spawn hands sys.path to the children. A `stamp` file, when given, receives
time.time() just before the rank fails, so a test can measure how long the launcher took to notice.
"""
import ctypes
import os
import subprocess
import time

import torch
import torch.distributed as dist


def _stamp(path):
    if path:
        with open(path, "w") as f:
            f.write(repr(time.time()))


def _wait_in_collective():
    """Block until every rank joins: never returns while a peer is dead (gloo fails it instead)."""
    dist.barrier()
    dist.all_reduce(torch.ones(1))


def fail_on(rank: int, message: str = "boom", stamp: str | None = None) -> None:
    """`rank` raises its own exception; the others wait in a collective that cannot complete."""
    if dist.get_rank() == rank:
        _stamp(stamp)
        raise RuntimeError(f"{message} on rank {rank}")
    _wait_in_collective()


def sleep_forever() -> None:
    """A run that never ends on its own: the launcher's timeout must stop it."""
    while True:
        time.sleep(1)


def die_by_signal(rank: int, signum: int, stamp: str | None = None) -> None:
    """`rank` sends itself `signum` (no Python traceback, no report); the others wait in a collective."""
    if dist.get_rank() == rank:
        _stamp(stamp)
        os.kill(os.getpid(), signum)
        time.sleep(60)  # a signal that does not kill (ignored, handled) must not pass for success
    _wait_in_collective()


def segfault(rank: int, stamp: str | None = None) -> None:
    """`rank` reads address 0 (SIGSEGV); the others wait in a collective."""
    if dist.get_rank() == rank:
        _stamp(stamp)
        ctypes.string_at(0)
    _wait_in_collective()


def abort(rank: int, stamp: str | None = None) -> None:
    """`rank` calls os.abort() (SIGABRT, what a failed C++ assertion does); the others wait in a collective."""
    if dist.get_rank() == rank:
        _stamp(stamp)
        os.abort()
    _wait_in_collective()


def exit_without_result(rank: int, code: int, peers: str = "sleep", stamp: str | None = None) -> None:
    """`rank` leaves with os._exit(code), skipping its report; the others sleep (peers="sleep": only the
    exit itself can end the run) or wait in a collective (peers="collective": gloo fails them too)."""
    if dist.get_rank() == rank:
        _stamp(stamp)
        os._exit(code)
    if peers == "collective":
        _wait_in_collective()
    time.sleep(300)


def with_grandchild(pidfile: str, fn, *args):
    """Start `sleep 300` (its pid goes to pidfile.<rank>), wait until every rank has, then run fn(*args):
    whatever fn does, the launcher must end the grandchildren too. Returns fn's value."""
    child = subprocess.Popen(["sleep", "300"])
    with open(f"{pidfile}.{dist.get_rank()}", "w") as f:
        f.write(str(child.pid))
    dist.barrier()
    return fn(*args)


def rank_and_threads() -> tuple[int, int, str | None]:
    """What a rank sees: its rank, torch's thread count and OMP_NUM_THREADS."""
    return dist.get_rank(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
