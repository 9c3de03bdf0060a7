"""Start one function on N ranks: from a notebook or test (spawned processes) or from a shell (torchrun).

    from course.parallel import launch
    res = launch.run(fn, 2, cfg, timeout=120)   # fn(cfg) runs on every rank inside a process group
    res.values[0], res.logs[1]                  # per-rank return values and captured stdout/stderr

    torchrun --nproc-per-node=2 -m course.parallel.train --strategy zero2   # same worker, torchrun's env

The rules a reader should know (checked here: torch 2.13 CPU, gloo):
- fn must live in an importable module: each rank is a fresh interpreter (start method "spawn"; its
  `import torch` took about 3 s of CPU here) that imports fn by name. Arguments are checked before spawning.
- Backend: NCCL when CUDA is present, gloo otherwise, decided in `backend()` only. On CPU keep
  everything fp32 (gloo has weak bf16 support).
- A rank reports once: its return value or its traceback. Ending any other way fails the run at once,
  not at the timeout: `Process.exitcode` -N means killed by signal N (SIGKILL is also the out-of-memory
  killer's), N >= 0 an exit without a report, `os._exit(0)` included. A segfault or abort writes the
  rank's Python stack into its log (faulthandler). The exit code can lag the process's pipes closing.
- When a rank dies, gloo fails the others' pending collectives within milliseconds ("Connection closed
  by peer", "Connection reset by peer"), and those errors may reach the parent first. So after the first
  failure the parent waits until every rank has reported or ended (at most GRACE s) and blames, in this
  order: a rank that died without reporting, one that raised its own exception, one whose error reads
  like a consequence (CONSEQUENCES); within a group the earliest, then the lowest rank. `RankFailed`
  has that rank, its exit code and signal (None when it raised) and every rank's log.
- A run that exceeds `timeout` (start-up included: over 60 s for two ranks on an overloaded 2-core
  machine here) is stopped and raises `TimeoutError`.
- Each rank leads its own process group (os.setsid); on every way out of run() the parent sends each
  group SIGTERM, then SIGKILL: nothing a rank started outlives run() unless it left the group (setsid,
  daemons). Orphans go to init; an init that does not reap (this container's) leaves zombies, not processes.
- Each rank gets OMP_NUM_THREADS = threads (default cores // world_size) so ranks do not fight over cores.
"""
from __future__ import annotations

import datetime
import faulthandler
import math
import numbers
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections import namedtuple
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GRACE = 2.0  # s: after the first failure, how long to collect the other ranks' fates before blaming one
TERM_WAIT = 1.0  # s from SIGTERM to SIGKILL when stopping the ranks' process groups
EXIT_WAIT = 5.0  # s a rank may take to exit after reporting its result (then it is stopped)
CONSEQUENCES = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out")


def backend(world_size: int | None = None) -> str:
    """The one place that picks the collective library: NCCL when there is a GPU for every local
    rank, gloo on the CPU otherwise (NCCL cannot put two ranks on one GPU)."""
    if world_size is None:
        world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"


def rank_device() -> torch.device:
    """This rank's device: its own GPU under NCCL (LOCAL_RANK), the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "LOCAL_RANK" in os.environ)


def init(timeout: float = 300.0) -> tuple[int, int]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    if not dist.is_initialized():
        kw = {}
        if backend() == "nccl":
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            kw["device_id"] = torch.device("cuda", local)
        dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=timeout), **kw)
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    """ValueError if `port` is not a usable, free TCP port on this machine."""
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an integer in 1..65535 or None (pick a free one), got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError as e:
            raise ValueError(f"port={port} is already taken ({e.strerror}); pass port=None to pick a free one") from None


class RankFailed(RuntimeError):
    """The rank that caused a failed run: `exitcode` and `signal` (a signal.Signals) say how its process
    ended when it died without reporting, None when it raised (`detail` has the traceback). `logs`: every rank's."""

    def __init__(self, rank: int, detail: str, logs: dict[int, str], exitcode: int | None = None, signal=None):
        self.rank, self.detail, self.logs, self.exitcode, self.signal = rank, detail, logs, exitcode, signal
        super().__init__(detail)


@dataclass
class RunResult:
    values: list[Any]  # fn's return value, per rank
    logs: list[str]  # captured stdout + stderr, per rank
    seconds: float  # wall time of the whole run, spawn included

    def __repr__(self):
        return f"RunResult({len(self.values)} ranks, {self.seconds:.1f} s)"


def _check_args(fn, world_size, timeout, threads) -> tuple[int, float, int | None]:
    """Everything run() can check before spawning; raises TypeError/ValueError naming the parameter."""
    if not callable(fn):
        raise TypeError(f"fn must be a function, got {fn!r} of type {type(fn).__name__}")
    qualname, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", None)
    if ("<lambda>" in qualname or "<locals>" in qualname or module is None
            or (module == "__main__" and not getattr(sys.modules.get("__main__"), "__file__", None))):
        raise ValueError(f"fn must be a top-level function of an importable module (spawned ranks import it "
                         f"by name); got {module}.{qualname}. Move it out of the notebook cell into a .py file.")

    def check(name, value, kind, allowed, ok):
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{name} must be {allowed}, got {value!r} of type {type(value).__name__}")
        if not ok(value):
            raise ValueError(f"{name} must be {allowed}, got {value!r}")

    check("world_size", world_size, numbers.Integral, "a positive integer (number of ranks)", lambda v: v >= 1)
    check("timeout", timeout, numbers.Real, "a finite number of seconds > 0", lambda v: math.isfinite(v) and v > 0)
    if threads is not None:
        check("threads", threads, numbers.Integral, "None (cores // world_size) or a positive integer",
              lambda v: v >= 1)
        threads = int(threads)
    return int(world_size), float(timeout), threads


def _worker(rank, world_size, port, job, threads, log_dir, conn, pg_timeout):
    os.setsid()  # this rank leads a new process group: one killpg ends it and everything it starts
    log = open(os.path.join(log_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)  # C++ warnings from torch/gloo land in the log too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    faulthandler.enable(log)  # a segfault or abort writes this rank's Python stack into its log
    try:
        fn, args = pickle.loads(job)  # here, not in spawn's bootstrap, so that an import error is reported
        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        kw, name = {}, backend(world_size)
        if name == "nccl":
            torch.cuda.set_device(rank)
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(name, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout), **kw)
        value = pickle.dumps(fn(*args))  # plain pickle: tensors by value, no shared memory
        conn.send_bytes(pickle.dumps(("ok", time.monotonic(), value)))
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: fn did not return
        last = traceback.format_exception_only(type(e), e)[-1].strip()
        conn.send_bytes(pickle.dumps(("error", time.monotonic(), (traceback.format_exc(), last))))
    finally:
        if dist.is_initialized():
            with suppress(Exception):
                dist.destroy_process_group()
        log.flush()


# Sorts in blame order: order (0 died without reporting, 1 raised, 2 raised a consequence), then time (the
# rank's clock when it raised: time.monotonic is system-wide on Linux; the parent's when it saw a death), rank.
_Cause = namedtuple("_Cause", "order time rank detail exitcode signal", defaults=(None, None))


def _died(rank: int, code: int, now: float, after_report: bool) -> _Cause:
    """Exit code -> cause: -N is signal N (a number outside signal.Signals stays a number)."""
    sig = signal.Signals(-code) if -code in signal.valid_signals() else None
    how = (f"was killed by signal {sig.name if sig else -code}" if code < 0 else f"exited with code {code}")
    how += " (also what the kernel's out-of-memory killer sends)" if sig == signal.SIGKILL else ""
    how += " after reporting its result" if after_report else "" if code < 0 else " without reporting a result"
    return _Cause(0, now, rank, f"rank {rank} {how}", code, sig)


def _watch(procs, conns, start: float, timeout: float):
    """Wait for every rank's report or end: ("ok", values), ("failed", causes) or ("timeout", ranks)."""
    n = len(procs)
    reports, codes, causes, fired, listening = {}, {}, [], set(), set(range(n))
    first_failure = all_ok = None
    while True:
        ready = wait([conns[r] for r in listening] + [procs[r].sentinel for r in range(n) if r not in fired], 0.1)
        now = time.monotonic()
        for r, p in enumerate(procs):
            if p.sentinel in ready:  # it closed its files; the exit code may come a moment later (polled)
                fired.add(r)
            code = None if r in codes else p.exitcode  # read before the pipe: a report sent before exiting is there
            if r in listening and conns[r].poll():
                listening.discard(r)
                with suppress(EOFError, OSError):  # fails when it ended without a report (or while sending it)
                    reports[r] = pickle.loads(conns[r].recv_bytes())
                if r in reports and reports[r][0] == "error":
                    tb, last = reports[r][2]
                    order = 2 if any(c in last.lower() for c in CONSEQUENCES) else 1
                    causes.append(_Cause(order, reports[r][1], r, f"rank {r} raised {last}\n{tb}"))
            if code is not None:
                codes[r] = code
                if r not in reports or (reports[r][0] == "ok" and code != 0):
                    causes.append(_died(r, code, now, after_report=r in reports))
        timed_out = now - start >= timeout
        if causes:
            first_failure = first_failure or now
            if timed_out or now - first_failure >= GRACE or all(r in codes or r in reports for r in range(n)):
                return "failed", sorted(causes)
        elif len(reports) == n:  # all returned: wait for their exits too, so that a crash at exit is seen
            all_ok = all_ok or now
            if len(codes) == n or now - all_ok >= EXIT_WAIT:
                return "ok", [pickle.loads(reports[r][2]) for r in range(n)]
        if timed_out:
            return "timeout", [r for r in range(n) if r not in reports]


def _stop(procs) -> None:
    """SIGTERM each rank's process group, SIGKILL after TERM_WAIT (sooner when all are gone), reap."""
    def signal_group(p, sig):  # True while the group the rank leads has members (it, or what it started)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
            return True
        return False

    procs = [p for p in procs if p.pid is not None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.exitcode is None:  # not reaped, so p.pid is still this rank: reach it even before its setsid
                os.kill(p.pid, sig)
            signal_group(p, sig)
        end = time.monotonic() + TERM_WAIT
        while sig == signal.SIGTERM and time.monotonic() < end and any(p.is_alive() or signal_group(p, 0)
                                                                       for p in procs):
            time.sleep(0.02)
    for p in procs:
        p.join()


def _tail(logs, rank: int, no_log: str) -> str:
    if logs[rank] is None:  # no log file: _worker had not run yet (spawn's bootstrap imports torch first)
        return f"--- rank {rank} {no_log} before its worker started (no log) ---"
    return f"--- rank {rank} log (tail) ---\n{logs[rank][-1500:]}"


def run(fn: Callable, world_size: int, *args, timeout: float = 120.0, port: int | None = None,
        threads: int | None = None) -> RunResult:
    """Run fn(*args) on `world_size` spawned ranks, each inside an initialised process group.

    Returns per-rank return values and logs. Raises RankFailed naming the rank that caused a failure
    (rules in the module docstring) as soon as one is seen, TimeoutError after `timeout` seconds.
    No rank, and nothing a rank started, is left running when this returns or raises.
    """
    world_size, timeout, threads = _check_args(fn, world_size, timeout, threads)
    if port is None:
        port = free_port()
    else:
        check_port(port)
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    job = pickle.dumps((fn, args))  # unpicklable arguments fail here, before anything is spawned

    ctx = mp.get_context("spawn")
    log_dir = tempfile.mkdtemp(prefix="course-parallel-")
    procs, conns, start, omp_before = [], [], time.monotonic(), os.environ.get("OMP_NUM_THREADS")
    try:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # children inherit the environment at start()
        try:
            for rank in range(world_size):
                recv, send = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_worker, daemon=True, args=(rank, world_size, port, job, threads, log_dir,
                                                                   send, min(timeout, 1e8)))  # timedelta-safe
                p.start()
                send.close()  # the rank holds the only write end: its exit closes the pipe
                procs.append(p)
                conns.append(recv)
        finally:
            if omp_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = omp_before
        outcome, found = _watch(procs, conns, start, timeout)
    finally:
        _stop(procs)  # every way out, success included: ranks blocked in a collective, grandchildren
        for c in conns:
            c.close()
        logs = {}
        for rank in range(world_size):
            path = Path(log_dir, f"rank{rank}.log")
            logs[rank] = path.read_text(errors="replace") if path.exists() else None
        shutil.rmtree(log_dir, ignore_errors=True)
    if outcome == "timeout":
        raise TimeoutError(f"run did not finish within timeout={timeout} s (ranks {found} had not reported); all "
                           f"ranks were stopped.\n" + "\n".join(_tail(logs, r, "was stopped") for r in logs))
    text = {r: log or "" for r, log in logs.items()}
    if outcome == "failed":
        cause, others = found[0], "".join(f"\n  {c.detail.splitlines()[0][:300]}" for c in found[1:])
        others = f"\nalso failed (later, or as a consequence):{others}" if others else ""
        no_log = "died (spawn's error, if any, went to this process's stderr)"
        raise RankFailed(cause.rank, f"{cause.detail}{others}\n{_tail(logs, cause.rank, no_log)}", text,
                         cause.exitcode, cause.signal)
    return RunResult(found, [text[r] for r in range(world_size)], time.monotonic() - start)


def main(fn: Callable, *args, nproc: int = 2, timeout: float = 600.0) -> list[Any]:
    """Entry point of an experiment module: under torchrun run fn here (this rank only, returns [value]);
    from a plain `python -m` spawn `nproc` ranks with run() and return every rank's value."""
    if under_torchrun():
        init(timeout)
        try:
            return [fn(*args)]
        finally:
            dist.destroy_process_group()
    return run(fn, nproc, *args, timeout=timeout).values
