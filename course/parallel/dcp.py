"""Distributed checkpoints: every rank writes its own shard, and any number of ranks reads them back.

    save(path, model, optimizer, step)       # FSDP2 / DTensor model: each rank writes what it holds
    step = load(path, model, optimizer)      # on N' ranks: each reads the pieces its new shards need
    saver = AsyncSaver(); saver.save(path, model, optimizer, step); ...train...; saver.wait()

PyTorch's Distributed Checkpoint (DCP, `torch.distributed.checkpoint`; docs "Distributed Checkpoint -
torch.distributed.checkpoint" and the tutorial "Getting Started with Distributed Checkpoint"):
- `get_state_dict(model, optimizer)` (torch.distributed.checkpoint.state_dict) gives the model's and the
  optimizer's state under the model's parameter names, each value a DTensor (for FSDP2: the rank's rows
  of dim 0 plus the global shape). `dcp.save` plans who writes what (a replicated value once, a sharded
  one by its owner), each rank writes its own file `__<rank>_0.distcp`, and the coordinator writes
  `.metadata` last: the global shape of every tensor and which file holds which chunk.
- `dcp.load` fills the state dict it is given IN PLACE: each rank's DTensors say which rows it needs
  now, the metadata says where they are, so a run saved on 4 ranks loads on 2 (resharding) with no
  gathering to one rank. `set_state_dict` then puts the values into the model and optimizer.
- A save is atomic here as in course.checkpoint: it goes to `<path>.incomplete`, rank 0 renames it to
  `<path>` once every rank has written (dcp.save returns after the metadata is written), then all meet.

Asynchronous saving (the PyTorch recipe "Asynchronous Saving with Distributed Checkpoint"; CheckFreq,
Mohan, Phanishayee and Chidambaram, FAST 2021, section 4.3, splits a checkpoint the same way into a
snapshot() that the next update must wait for and a persist() that overlaps training): the training
step is blocked only while the state is copied ("staged") into CPU memory; writing the copy runs in a
background thread. Its collectives (planning, the metadata) run over a separate gloo process group so
they never interleave with the training's. `AsyncSaver` is that, written out; `torch_async_save` calls `dcp.async_save`.
"""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor


def training_state(model, optimizer, step: int) -> dict:
    """{"model": ..., "optim": ..., "step": tensor}: DTensor shards for a sharded model."""
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd, "step": torch.tensor(step)}


def _incomplete(path: Path) -> Path:
    return path.with_name(path.name + ".incomplete")


def _publish(path: Path, group=None) -> None:
    """Rank 0 renames <path>.incomplete to <path> (replacing an older one), then everyone meets."""
    if dist.get_rank() == 0:
        if path.exists():
            shutil.rmtree(path)
        _incomplete(path).rename(path)
    dist.barrier(group=group)


def _check(path, step=None) -> Path:
    if not isinstance(path, (str, Path)):
        raise ValueError(f"path must be a directory path (str or Path), got {type(path).__name__}")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    return Path(path)


def save(path, model, optimizer, step: int, group=None) -> None:
    """Synchronous: every rank writes its shard of model + optimizer into the directory `path`."""
    path = _check(path, step)
    dcp.save(training_state(model, optimizer, step), checkpoint_id=_incomplete(path), process_group=group)
    _publish(path, group)


def load(path, model, optimizer, group=None) -> int:
    """Fill model and optimizer (sharded for THIS world size) from `path`; returns the saved step."""
    path = _check(path)
    if not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a complete distributed checkpoint (no .metadata file)"
                         + (f"; {_incomplete(path)} is a save that did not finish" if _incomplete(path).exists() else ""))
    state = training_state(model, optimizer, 0)
    dcp.load(state, checkpoint_id=path, process_group=group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["step"])


def stage(state):
    """A copy in CPU memory that later updates cannot change (DTensors stay DTensors, local pieces copied)."""
    if isinstance(state, dict):
        return {k: stage(v) for k, v in state.items()}
    if isinstance(state, list):
        return [stage(v) for v in state]
    if isinstance(state, DTensor):
        local = state.to_local().detach().to("cpu", copy=True)
        return DTensor.from_local(local, state.device_mesh, state.placements, run_check=False,
                                  shape=state.shape, stride=state.stride())
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    return state


class AsyncSaver:
    """Stage to CPU memory (the step waits for this), write in a background thread (it does not).
    One save in flight at a time: a new save first waits for the previous one. `blocked_s`: the time
    the caller waited in each save()."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo")  # the background writer's own collectives
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.blocked_s: list[float] = []

    def save(self, path, model, optimizer, step: int) -> None:
        path = _check(path, step)
        t0 = time.perf_counter()
        self.wait()
        staged = stage(training_state(model, optimizer, step))

        def write():
            try:
                dcp.save(staged, checkpoint_id=_incomplete(path), process_group=self.group)
                _publish(path, self.group)
            except BaseException as e:  # reported by wait(), in the training thread
                self.error = e
        self.thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self.thread.start()
        self.blocked_s.append(time.perf_counter() - t0)

    def wait(self) -> None:
        """Until the save in flight is on disk; re-raises its error here."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise RuntimeError(f"the background checkpoint write failed: {error}") from error


def torch_async_save(path, model, optimizer, step: int, group):
    """PyTorch's own: dcp.async_save stages to CPU and writes in a thread; returns a future. Publish
    (rename) after future.result() with `publish(path, group)`."""
    path = _check(path, step)
    return dcp.async_save(training_state(model, optimizer, step), checkpoint_id=_incomplete(path),
                          process_group=group)


def publish(path, group=None) -> None:
    _publish(Path(path), group)
