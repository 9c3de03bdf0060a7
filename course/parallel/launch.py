"""Start one function on N ranks: from a notebook or test (spawned processes) or from a shell (torchrun).

    from course.parallel import launch
    res = launch.run(fn, 2, cfg, timeout=120)   # fn(cfg) runs on every rank inside a process group
    res.values[0], res.logs[1]                  # per-rank return values and captured stdout/stderr

    torchrun --nproc-per-node=2 -m course.parallel.train --strategy zero2   # same worker, torchrun's env

The rules a reader should know:
- Worker functions must live in an importable module: spawned processes re-import them by name.
- Backend: NCCL when CUDA is present, gloo otherwise, decided in `backend()` only. On CPU keep
  everything fp32 (gloo has weak bf16 support and no all_to_all).
- A rank that raises ends the whole run: the parent kills the other ranks (they may be blocked in a
  collective waiting for the dead one) and raises `RankFailed` with that rank's traceback. A run that
  exceeds `timeout` is killed and raises `TimeoutError`. No process outlives `run()`.
- Each worker gets OMP_NUM_THREADS = cores // world_size so N ranks do not fight over the cores.
"""
from __future__ import annotations

import datetime
import os
import pickle
import queue
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


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
    """A rank raised (or died); carries that rank's number, its traceback and every rank's log."""

    def __init__(self, rank: int, detail: str, logs: dict[int, str]):
        self.rank, self.detail, self.logs = rank, detail, logs
        super().__init__(f"rank {rank} failed:\n{detail}")


@dataclass
class RunResult:
    values: list[Any]  # fn's return value, per rank
    logs: list[str]  # captured stdout + stderr, per rank
    seconds: float  # wall time of the whole run, spawn included

    def __repr__(self):
        return f"RunResult({len(self.values)} ranks, {self.seconds:.1f} s)"


def _check_importable(fn: Callable) -> None:
    qualname = getattr(fn, "__qualname__", "")
    module = getattr(fn, "__module__", None)
    main = sys.modules.get("__main__")
    if ("<lambda>" in qualname or "<locals>" in qualname or module is None
            or (module == "__main__" and not getattr(main, "__file__", None))):
        raise ValueError(f"fn must be a top-level function of an importable module (spawned ranks import it "
                         f"by name); got {module}.{qualname}. Move it out of the notebook cell into a .py file.")


def _worker(rank, world_size, port, fn, args, threads, log_dir, results, pg_timeout):
    log = open(os.path.join(log_dir, f"rank{rank}.log"), "w", buffering=1)
    os.dup2(log.fileno(), 1)  # C++ warnings from torch/gloo land in the log too
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    try:
        torch.set_num_threads(threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        kw, name = {}, backend(world_size)
        if name == "nccl":
            torch.cuda.set_device(rank)
            kw["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(name, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout), **kw)
        value = fn(*args)
        results.put((rank, "ok", pickle.dumps(value)))  # plain pickle: tensors by value, no shared memory
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        log.flush()


def run(fn: Callable, world_size: int, *args, timeout: float = 120.0, port: int | None = None,
        threads: int | None = None) -> RunResult:
    """Run fn(*args) on `world_size` spawned ranks, each inside an initialised process group.

    Returns per-rank return values and logs. Raises RankFailed (with the rank's traceback) as soon as
    any rank raises, TimeoutError after `timeout` seconds; every rank is gone when this returns or raises.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    _check_importable(fn)
    if port is None:
        port = free_port()
    else:
        check_port(port)
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    log_dir = tempfile.mkdtemp(prefix="course-parallel-")
    procs, values, failure = [], {}, None
    start = time.monotonic()
    try:
        omp_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # children inherit the environment at start()
        try:
            for rank in range(world_size):
                p = ctx.Process(target=_worker, args=(rank, world_size, port, fn, args, threads, log_dir,
                                                      results, timeout), daemon=True)
                p.start()
                procs.append(p)
        finally:
            if omp_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = omp_before
        while len(values) < world_size and failure is None:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                failure = ("timeout", None, f"run did not finish within timeout={timeout} s")
                break
            try:
                rank, status, payload = results.get(timeout=min(left, 0.2))
            except queue.Empty:
                for r, p in enumerate(procs):  # died without reporting (killed, segfault, os._exit)
                    if p.exitcode not in (None, 0) and r not in values:
                        failure = ("died", r, f"rank {r} exited with code {p.exitcode} without reporting")
                continue
            if status == "error":
                failure = ("error", rank, payload)
            else:
                values[rank] = pickle.loads(payload)
    finally:
        for p in procs:  # ranks still blocked in a collective are stopped here
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
        logs = {}
        for rank in range(world_size):
            try:
                with open(os.path.join(log_dir, f"rank{rank}.log")) as f:
                    logs[rank] = f.read()
            except OSError:
                logs[rank] = ""
        shutil.rmtree(log_dir, ignore_errors=True)
    if failure is not None:
        kind, rank, detail = failure
        if kind == "timeout":
            tails = "\n".join(f"--- rank {r} log (tail) ---\n{logs[r][-1500:]}" for r in logs)
            raise TimeoutError(f"{detail}; all ranks were stopped.\n{tails}")
        raise RankFailed(rank, detail + f"\n--- rank {rank} log (tail) ---\n{logs[rank][-1500:]}", logs)
    return RunResult([values[r] for r in range(world_size)], [logs[r] for r in range(world_size)],
                     time.monotonic() - start)


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
