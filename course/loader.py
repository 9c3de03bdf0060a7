"""Data levers for training throughput and quality: a memory-mapped token file, a background-prefetch
loader, a quality filter with exact and near deduplication, and input-noise injection.

- Token file: the corpus is tokenized ONCE and written as a flat array of token ids (uint16 when the
  vocabulary fits, as nanoGPT's train.bin); training opens it with `numpy.memmap`, so starting costs
  no tokenization and a batch reads only its B·(T+1) ids from the page cache. `MemmapData.batch`
  draws exactly the windows `course.data.TextData.batch` draws (same generator calls), so the two are
  interchangeable, bit for bit. `OnTheFlyData` is the alternative: raw text, tokenized per batch.
- `Prefetcher(batch_fn)`: a thread prepares the next `depth` training batches while the model steps
  (torch ops release the GIL), behind a bounded queue.Queue; errors in the thread surface in the
  caller. Same batches, same order as calling batch_fn directly, because each split draws from its
  own generator (`batches(...)`).
- `filter_documents(docs)`: exact duplicates (hash of whitespace-normalized text), near duplicates
  (MinHash over hashed 5-word shingles with LSH banding, then the exact Jaccard similarity of the
  candidate pairs), and Gopher's quality rules (Rae et al. 2021, "Scaling Language Models: Methods,
  Analysis & Insights from Training Gopher", appendix A, MassiveWeb quality filters: 50..100,000
  words, mean word length 3..10, symbol-to-word ratio <= 0.1, <= 90 % bullet lines, <= 30 % lines
  ending in an ellipsis, >= 80 % of words with a letter, >= 2 of 8 stop words). GPT-3 (Brown et al.
  2020, appendix A) fuzzily deduplicated each dataset with Spark's MinHashLSH (10 hashes), which
  removed ~10 % of the data, after filtering Common Crawl with a quality classifier (not done here:
  it needs a reference corpus of "good" text to train on).
- `noisy_inputs(batch_fn, p)`: replace a fraction p of the input tokens by random ids, targets kept
  (noise injection as a regularizer for a corpus seen for many epochs).
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import threading
import time
from dataclasses import dataclass

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


# ----------------------------------------------------------------------------- quality filter

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))  # Gopher's eight


@dataclass(frozen=True)
class QualityRules:
    """Gopher's MassiveWeb thresholds (Rae et al. 2021, appendix A); None switches a rule off."""
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_len: float | None = 3.0
    max_mean_word_len: float | None = 10.0
    max_symbol_ratio: float | None = 0.1  # ('#' and '...' / '…') per word
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    min_alpha_words: float | None = 0.8  # words with at least one letter
    min_stop_words: int | None = 2


def quality_reason(doc: str, rules: QualityRules = QualityRules()) -> str | None:
    """Why `doc` fails the rules ('too few words', ...), or None when it passes."""
    if not isinstance(doc, str):
        raise ValueError(f"doc must be a str, got {type(doc).__name__}")
    words = doc.split()
    n = len(words)
    r = rules
    if r.min_words is not None and n < r.min_words:
        return "too few words"
    if r.max_words is not None and n > r.max_words:
        return "too many words"
    if n == 0:
        return "empty"
    mean = sum(map(len, words)) / n
    if (r.min_mean_word_len is not None and mean < r.min_mean_word_len) or \
            (r.max_mean_word_len is not None and mean > r.max_mean_word_len):
        return "mean word length"
    if r.max_symbol_ratio is not None and (doc.count("#") + doc.count("...") + doc.count("…")) / n > r.max_symbol_ratio:
        return "symbol-to-word ratio"
    lines = [l.strip() for l in doc.splitlines() if l.strip()]
    if r.max_bullet_lines is not None and sum(l[0] in "•*-‣▪" for l in lines) / len(lines) > r.max_bullet_lines:
        return "bullet lines"
    if r.max_ellipsis_lines is not None and \
            sum(l.endswith(("...", "…")) for l in lines) / len(lines) > r.max_ellipsis_lines:
        return "ellipsis lines"
    if r.min_alpha_words is not None and sum(bool(re.search(r"[^\W\d_]", w)) for w in words) / n < r.min_alpha_words:
        return "words without letters"
    if r.min_stop_words is not None and len({w.lower() for w in words} & STOP_WORDS) < r.min_stop_words:
        return "too few stop words"
    return None


def _hash64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


def shingles(doc: str, n: int = 5) -> set[int]:
    """Hashes of the document's n-word windows (lower-cased; whole text if shorter than n words)."""
    words = doc.lower().split()
    return {_hash64(" ".join(words[i:i + n])) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


_PRIME = 4294967311  # the smallest prime above 2^32


def minhash(sh: set[int], num_perm: int = 32, seed: int = 0) -> np.ndarray:
    """(num_perm,) minima of h_i(x) = (a_i·x + b_i) mod p over the set's 32-bit values: for a random
    permutation-like h, P[two sets' minima agree] = their Jaccard similarity (Broder 1997).
    a < 2^31, x < 2^32, b < 2^32: a·x + b < 2^64, exact in uint64."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2 ** 31, num_perm, dtype=np.uint64)[:, None]
    b = rng.integers(0, 2 ** 32, num_perm, dtype=np.uint64)[:, None]
    xs = np.fromiter((x & 0xFFFFFFFF for x in sh), dtype=np.uint64, count=len(sh))[None, :]
    return ((a * xs + b) % np.uint64(_PRIME)).min(axis=1)  # (num_perm,)


def near_duplicates(docs, threshold: float = 0.8, n: int = 5, num_perm: int = 32, bands: int = 16) -> dict[int, int]:
    """{index: index of the earlier document it nearly copies}: MinHash LSH finds candidate pairs
    (some band of num_perm/bands rows equal), the exact shingle Jaccard >= threshold confirms them."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if num_perm % bands:
        raise ValueError(f"num_perm ({num_perm}) must be a multiple of bands ({bands})")
    sets = [shingles(d, n) for d in docs]
    rows, buckets, dup = num_perm // bands, {}, {}
    for i, s in enumerate(sets):
        sig = minhash(s, num_perm)
        candidates = set()
        for band in range(bands):
            key = (band, tuple(sig[band * rows:(band + 1) * rows]))
            candidates.update(buckets.setdefault(key, []))
            buckets[key].append(i)
        for j in sorted(candidates):
            if jaccard(s, sets[j]) >= threshold:  # j may itself be a copy: clusters go whole
                dup[i] = j
                break
    return dup


def filter_documents(docs, rules: QualityRules | None = QualityRules(), near_threshold: float | None = 0.8):
    """(kept documents, {reason: count}): exact duplicates, then quality rules, then near duplicates."""
    seen, kept, report = set(), [], {}
    for doc in docs:
        key = _hash64(" ".join(doc.split()))
        reason = "exact duplicate" if key in seen else (quality_reason(doc, rules) if rules else None)
        seen.add(key)
        if reason:
            report[reason] = report.get(reason, 0) + 1
        else:
            kept.append(doc)
    if near_threshold is not None:
        dup = near_duplicates(kept, near_threshold)
        kept = [d for i, d in enumerate(kept) if i not in dup]
        if dup:
            report["near duplicate"] = len(dup)
    return kept, report


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
