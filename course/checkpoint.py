"""Checkpoints of the whole training state, written so that a crash at any moment loses nothing saved.

    ckpt = Checkpointer("runs/a", every=10, keep=3, data=gen)       # gen: the batches' torch.Generator
    hist = train(model, batch_fn, cfg, hooks=[ckpt], resume=ckpt.resume)   # the same call starts and resumes

What a run needs to continue as if it had never stopped (so that it repeats the same float operations
in the same order, and the resumed run equals the uninterrupted one bit for bit on a CPU):
- the model's parameters and buffers, and the optimizer's state (AdamW: its step count and both moments);
- the loop's position: the step to run next (the learning rate is `lr_at(step)`, a function of it) and
  the History so far;
- every random number generator: torch's CPU generator (dropout, torch.randint without a generator),
  CUDA's when present, Python's `random`, NumPy's global one;
- the data position: the torch.Generator the batches are drawn from (`TextData.batch(..., generator=g)`
  draws windows from it, so its state IS the position in the stream), or any loader with
  state_dict()/load_state_dict() (CheckFreq, Mohan et al. FAST 2021, checkpoints its data iterator so).

How a file is written (as DCP's FileSystemWriter writes its .metadata: temp file, fsync, rename): the
bytes go to a temporary file in the same directory, which is flushed and fsync'ed (the data is on
disk), then renamed over the final name with os.replace (atomic on POSIX: a reader sees the old file or
the new one, never a half), then the directory is fsync'ed (the rename itself is on disk). A process
killed at any point leaves at most a stale temporary file, never a partial file under a final name.
The file starts with one header line, `course-checkpoint v1 sha256=<hex> bytes=<n>`, then the payload
(torch.save of a dict); load checks the length (truncated) and the SHA-256 (corrupted: a flipped bit, a
torn copy) before unpickling anything, and unpickles with weights_only=True (tensors and plain values).
`latest_valid(dir)` returns the newest file that passes, warning about each newer one that does not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .train import History, unwrap

HEADER = re.compile(rb"course-checkpoint v1 sha256=([0-9a-f]{64}) bytes=([0-9]+)\n")
NAME = re.compile(r"step-(\d{8})(?:-rank(\d+))?\.ckpt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not one, truncated, corrupted, or for another model."""


# ----------------------------------------------------------------------------- random number generators

def rng_state() -> dict:
    """Every global generator's state, as tensors and plain values (what weights_only loading allows)."""
    version, mt, gauss = random.getstate()  # mt: 625 ints < 2**32
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def _data_items(data) -> dict:
    if data is None:
        return {}
    items = data if isinstance(data, dict) else {"data": data}
    for name, obj in items.items():
        if not (isinstance(obj, torch.Generator) or (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"))):
            raise ValueError(f"data[{name!r}] must be a torch.Generator or have state_dict()/load_state_dict(), "
                             f"got {type(obj).__name__}")
    return items


def _data_state(data) -> dict:
    return {k: (v.get_state() if isinstance(v, torch.Generator) else v.state_dict()) for k, v in _data_items(data).items()}


# ----------------------------------------------------------------------------- one file

def _write(f, blob: bytes) -> None:
    """Write the bytes (one function, so that a test can stop a process in the middle of a write)."""
    f.write(blob)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, blob: bytes) -> Path:
    """Write `blob` to `path` so that `path` is either absent/old or complete: temp file, fsync, rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _write(f, blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write checkpoint {path} ({e.strerror or e}); nothing under that name "
                               f"was changed and earlier checkpoints in {path.parent} are intact") from e
    return path


def save(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, step: int = 0,
         data=None, history: History | None = None, extra: dict | None = None) -> Path:
    """Save the whole training state to `path` atomically. `step`: the step to run next after a resume.
    data: the batches' torch.Generator, a loader with state_dict(), or a dict of them. Returns the path."""
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"the checkpoint directory {path.parent} does not exist (or is not a directory)")
    state = {"step": step, "model": unwrap(model).state_dict(),
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "rng": rng_state(), "data": _data_state(data),
             "history": dataclasses.asdict(history) if history is not None else None, "extra": extra or {}}
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = f"course-checkpoint v1 sha256={hashlib.sha256(payload).hexdigest()} bytes={len(payload)}\n".encode()
    return atomic_write(path, header + payload)


def read(path) -> dict:
    """The verified state saved in `path` (nothing restored). CheckpointError if it is not intact."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    blob = path.read_bytes()
    head = HEADER.match(blob[:200])
    if head is None:
        raise CheckpointError(f"{path} is not a course checkpoint (its first line is not "
                              f"'course-checkpoint v1 sha256=... bytes=...'), or its header is damaged")
    payload, want = blob[head.end():], int(head.group(2))
    if len(payload) != want:
        raise CheckpointError(f"{path} is truncated: the header promises {want} bytes of payload, the file holds "
                              f"{len(payload)}")
    if hashlib.sha256(payload).hexdigest() != head.group(1).decode():
        raise CheckpointError(f"{path} is corrupted: the SHA-256 of its payload differs from the one in its header")
    return torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")


def check_shapes(saved: dict, model: torch.nn.Module, where="") -> None:
    """CheckpointError naming the first parameter whose name or shape differs between the two."""
    own = unwrap(model).state_dict()
    for name in saved:
        if name not in own:
            raise CheckpointError(f"checkpoint{where} holds '{name}', which this model does not have: it was saved "
                                  f"from another model")
        if tuple(saved[name].shape) != tuple(own[name].shape):
            raise CheckpointError(f"checkpoint{where} was saved from another model shape: parameter '{name}' is "
                                  f"{tuple(saved[name].shape)} there and {tuple(own[name].shape)} in this model")
    missing = [n for n in own if n not in saved]
    if missing:
        raise CheckpointError(f"checkpoint{where} lacks {missing[:3]} of this model: it was saved from another model")


def load(path, model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
         data=None, restore_rng: bool = True) -> dict:
    """Verify `path`, restore what is given in place (model, optimizer, data position) and every global
    generator; return the state: "step" (to run next), "history" (a History or None), "extra"."""
    state = read(path)
    if model is not None:
        check_shapes(state["model"], model, f" {path}")
        unwrap(model).load_state_dict(state["model"])
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"{path} holds no optimizer state (saved with optimizer=None)")
        optimizer.load_state_dict(state["optimizer"])
    for name, obj in _data_items(data).items():
        if name not in state["data"]:
            raise CheckpointError(f"{path} holds no data position named {name!r} (it has {sorted(state['data'])})")
        if isinstance(obj, torch.Generator):
            obj.set_state(state["data"][name])
        else:
            obj.load_state_dict(state["data"][name])
    if restore_rng:
        set_rng_state(state["rng"])
    if state["history"] is not None:
        state["history"] = History(**state["history"])
    return state


# ----------------------------------------------------------------------------- a directory of them

def checkpoint_name(step: int, rank: int | None = None) -> str:
    return f"step-{step:08d}" + (f"-rank{rank}" if rank is not None else "") + ".ckpt"


def list_checkpoints(directory, rank: int | None = None) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint name in `directory` for `rank`, oldest first (temp files excluded)."""
    out = []
    for p in Path(directory).iterdir() if Path(directory).is_dir() else ():
        m = NAME.fullmatch(p.name)
        if m and (None if m.group(2) is None else int(m.group(2))) == rank:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_valid(directory, rank: int | None = None, max_step: int | None = None) -> Path | None:
    """The newest checkpoint in `directory` that reads back intact (at most max_step); warns naming each
    newer one it skips, and why. None if there is none."""
    for step, path in reversed(list_checkpoints(directory, rank)):
        if max_step is not None and step > max_step:
            continue
        try:
            read(path)
            return path
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
    return None


class Checkpointer:
    """A train() hook that saves every `every` steps into `directory` (keeping the newest `keep`), and
    `resume`, the function train() calls to continue from the newest valid checkpoint there.

    comm: under data parallelism every rank saves its own file (its data generator differs) and, on
    resume, the ranks agree on the newest step that every rank has intact."""

    def __init__(self, directory, every: int = 10, keep: int = 3, data=None, comm=None):
        for name, v in (("every", every), ("keep", keep)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Checkpointer.{name} must be an integer >= 1, got {v!r}")
        self.directory, self.every, self.keep, self.data, self.comm = Path(directory), every, keep, data, comm
        _data_items(data)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the checkpoint directory {self.directory}: {e.strerror}") from e
        self.rank = comm.rank if comm is not None and comm.world > 1 else None
        self.saved: list[Path] = []
        self.resumed_from: Path | None = None
        self.saving_step: int | None = None  # the step of the checkpoint being written

    def __call__(self, event: str, state) -> None:
        if event == "after_step" and (state.step + 1) % self.every == 0:
            self.save(state.step + 1, state.model, state.optimizer, state.history)

    def save(self, step, model, optimizer, history=None) -> Path:
        self.saving_step = step
        path = save(self.directory / checkpoint_name(step, self.rank), model, optimizer, step, self.data, history)
        self.saved.append(path)
        for _, old in list_checkpoints(self.directory, self.rank)[:-self.keep]:
            old.unlink(missing_ok=True)
        return path

    def resume(self, model, optimizer):
        """Restore the newest valid checkpoint into model, optimizer, data and the generators; returns
        (step, History) for train(), or None when there is nothing to resume from (a fresh start)."""
        for stale in self.directory.iterdir():  # this rank's writes that a kill interrupted
            m = re.fullmatch(r"\.(.+)\.tmp-\d+", stale.name)
            named = m and NAME.fullmatch(m.group(1))
            if named and (None if named.group(2) is None else int(named.group(2))) == self.rank:
                stale.unlink(missing_ok=True)
        path = latest_valid(self.directory, self.rank)
        if self.rank is not None:  # agree: the newest step intact on every rank
            import torch.distributed as dist
            mine = torch.tensor([int(NAME.fullmatch(path.name).group(1)) if path else -1])
            dist.all_reduce(mine, op=dist.ReduceOp.MIN, group=self.comm.group)
            step = int(mine)
            path = None if step < 0 else latest_valid(self.directory, self.rank, max_step=step)
            if path is not None and int(NAME.fullmatch(path.name).group(1)) != step:
                raise CheckpointError(f"rank {self.rank} has no intact checkpoint of step {step}, the newest that "
                                      f"every rank holds; keep more checkpoints (keep={self.keep})")
        if path is None:
            return None
        state = load(path, model, optimizer, self.data)
        self.resumed_from = path
        return state["step"], state["history"] or History()
