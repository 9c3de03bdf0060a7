"""Data levers for training throughput: a memory-mapped token file, a background-prefetch loader, and
input-noise injection (the quality filter and deduplication are in course.quality).

- Token file: the corpus is tokenized ONCE and written as a flat array of token ids (uint16 when the
  vocabulary fits, as nanoGPT's train.bin); training opens it with `numpy.memmap`, so starting costs
  no tokenization and a batch reads only its B·(T+1) ids from the page cache. `MemmapData.batch`
  draws exactly the windows `course.data.TextData.batch` draws (same generator calls), so the two are
  interchangeable, bit for bit. `OnTheFlyData` is the alternative: raw text, tokenized per batch.
- `Prefetcher(batch_fn)`: a thread prepares the next `depth` training batches while the model steps
  (torch ops release the GIL), behind a bounded queue.Queue; errors in the thread surface in the
  caller. Same batches, same order as calling batch_fn directly, because each split draws from its
  own generator (`batches(...)`).
- `noisy_inputs(batch_fn, p)`: replace a fraction p of the input tokens by random ids, targets kept
  (noise injection as a regularizer for a corpus seen for many epochs).
"""
from __future__ import annotations

import json
import os
import queue
import threading
import time
import numpy as np
import torch

SPLITS = ("train", "val")


def _check_positive(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


# ----------------------------------------------------------------------------- token files

def write_tokens(path: str, ids, vocab_size: int) -> str:
    """Write token ids once as a flat binary array (+ `path.json`: dtype, count). Returns path."""
    _check_positive("vocab_size", vocab_size)
    dtype = np.uint16 if vocab_size <= 2 ** 16 else np.uint32
    arr = np.asarray(ids.numpy() if torch.is_tensor(ids) else ids, dtype=np.int64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D sequence of token ids, got shape {arr.shape}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise ValueError(f"ids must lie in [0, vocab_size={vocab_size}), got {arr.min()}..{arr.max()}")
    arr.astype(dtype).tofile(path)
    with open(path + ".json", "w") as f:
        json.dump({"dtype": np.dtype(dtype).name, "count": int(arr.size), "vocab_size": vocab_size}, f)
    return path


def open_tokens(path: str) -> np.memmap:
    """The token file as a read-only numpy.memmap (nothing is read until a window is indexed)."""
    try:
        with open(path + ".json") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"path={path!r} is not a token file written by write_tokens (no {path}.json)") from None
    size = os.path.getsize(path)
    if size != meta["count"] * np.dtype(meta["dtype"]).itemsize:
        raise ValueError(f"token file {path!r} has {size} bytes, its header says {meta['count']} x {meta['dtype']}: "
                         f"truncated or overwritten; write it again")
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["count"],))


def _windows(n: int, batch_size: int, block_size: int, generator, split: str):
    """TextData.batch's window starts: the same checks, the same generator call."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    _check_positive("batch_size", batch_size)
    _check_positive("block_size", block_size)
    if n <= block_size + 1:
        raise ValueError(f"block_size={block_size} is too long for the {split} split ({n} tokens)")
    return torch.randint(n - block_size - 1, (batch_size,), generator=generator)


class MemmapData:
    """Train/val token files opened with numpy.memmap; .batch() as course.data.TextData.batch."""

    def __init__(self, folder: str):
        self.folder = folder
        self.train, self.val = (open_tokens(os.path.join(folder, f"{s}.bin")) for s in SPLITS)

    @classmethod
    def write(cls, data, folder: str) -> "MemmapData":
        """Write a course.data.TextData's two splits (already tokenized) to folder/{train,val}.bin."""
        os.makedirs(folder, exist_ok=True)
        for split in SPLITS:
            write_tokens(os.path.join(folder, f"{split}.bin"), getattr(data, split), data.tokenizer.vocab_size)
        return cls(folder)

    def batch(self, split, batch_size, block_size, generator=None, device=None):
        data = self.train if split == "train" else self.val
        ix = _windows(len(data), batch_size, block_size, generator, split).numpy()
        window = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))  # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]
        return (x, y) if device is None else (x.to(device), y.to(device))


class OnTheFlyData:
    """Raw text, tokenized per batch: each window encodes `chars_per_token`·(T+1) characters from a random offset."""

    def __init__(self, train_text: str, val_text: str, tokenizer, chars_per_token: int = 8):
        _check_positive("chars_per_token", chars_per_token)
        self.train, self.val, self.tokenizer, self.cpt = train_text, val_text, tokenizer, chars_per_token

    def batch(self, split, batch_size, block_size, generator=None, device=None):
        text = self.train if split == "train" else self.val
        span = self.cpt * (block_size + 1)
        ix = _windows(len(text) - span + block_size + 1, batch_size, block_size, generator, split)
        rows = []
        for i in ix.tolist():
            ids = self.tokenizer.encode(text[i:i + span])[:block_size + 1]
            if len(ids) < block_size + 1:
                raise ValueError(f"chars_per_token={self.cpt} gave {len(ids)} tokens for a window of "
                                 f"{block_size + 1}: raise chars_per_token")
            rows.append(ids)
        window = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]
        return (x, y) if device is None else (x.to(device), y.to(device))


def batches(data, batch_size: int, block_size: int, seed: int = 0, device=None):
    """batch_fn(split) for course.train: each split draws from its own seeded generator, so the
    training batches do not depend on when validation batches are drawn (what prefetching needs)."""
    gens = {s: torch.Generator().manual_seed(seed * 2 + i) for i, s in enumerate(SPLITS)}

    def fn(split):
        if split not in gens:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return data.batch(split, batch_size, block_size, generator=gens[split], device=device)
    return fn


def with_latency(batch_fn, seconds: float):
    """batch_fn that waits `seconds` first: slow storage or a network file system (sleep frees the GIL)."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < 60:
        raise ValueError(f"seconds must be a number in [0, 60), got {seconds!r}")

    def fn(split):
        time.sleep(seconds)
        return batch_fn(split)
    return fn


# ----------------------------------------------------------------------------- prefetch

class Prefetcher:
    """batch_fn(split) whose training batches a background thread prepares `depth` ahead.

    batch_fn must draw 'train' and 'val' from separate streams (`batches(...)` does): the thread calls
    batch_fn('train') while the caller may call batch_fn('val'). Use as a context manager, or close()."""

    def __init__(self, batch_fn, depth: int = 2):
        _check_positive("depth", depth)
        self.batch_fn, self.depth = batch_fn, depth
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._work, daemon=True, name="prefetch")
        self.thread.start()

    def _work(self):
        while not self.stop.is_set():
            try:
                item = ("batch", self.batch_fn("train"))
            except BaseException as e:  # hand it to the consumer, then stop
                item = ("error", e)
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if item[0] == "error":
                return

    def __call__(self, split: str):
        if split != "train":
            return self.batch_fn(split)
        if self.stop.is_set():
            raise RuntimeError("this Prefetcher is closed")
        kind, value = self.queue.get()
        if kind == "error":
            self.close()
            raise value
        return value

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------- noise injection

def noisy_inputs(batch_fn, p: float, vocab_size: int, seed: int = 0, low: int = 0):
    """batch_fn whose training inputs have each token replaced, with probability p, by a random id in
    [low, vocab_size); targets and validation batches are untouched."""
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a number in [0, 1), got {p!r}")
    _check_positive("vocab_size", vocab_size)
    g = torch.Generator().manual_seed(seed)

    def fn(split):
        x, y, *rest = batch_fn(split)
        if split == "train" and p > 0:
            flip = torch.rand(x.shape, generator=g) < p
            x = torch.where(flip, torch.randint(low, vocab_size, x.shape, generator=g), x)
        return (x, y, *rest)
    return fn
