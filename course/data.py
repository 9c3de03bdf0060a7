"""Real English text with no download, two tokenizers, and batches.

Text: Python ships its own documentation. `pydoc_data.topics` holds the language reference
(79 topics, ~465k characters); the standard library's docstrings, read with `ast` so nothing is
imported, add ~1.8M characters. Both are identical on every machine with the same CPython.

Tokenizers reserve ids 0..4 for [PAD] [UNK] [CLS] [SEP] [MASK] (BERT's special tokens), then:
- CharTokenizer: one id per character seen in training text.
- BPETokenizer: byte-level byte-pair encoding (Sennrich et al. 2016; GPT-2's byte-level
  variant, Radford et al. 2019): 256 byte ids, then merges learned from the text.

Train/validation split is by passage (~2,000 characters on paragraph boundaries, every k-th to
validation), so it is deterministic and the validation text is unseen prose from every topic.
"""
from __future__ import annotations

import ast
import functools
import os
import re
import sysconfig
from collections import Counter
from dataclasses import dataclass

import torch

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SOURCES = ("pydoc", "docstrings", "both")


# ----------------------------------------------------------------------------- text

@functools.lru_cache(maxsize=None)
def load_documents(source: str = "pydoc") -> tuple[str, ...]:
    """Documents of a source, in a fixed order."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    docs: list[str] = []
    if source in ("pydoc", "both"):
        from pydoc_data.topics import topics
        docs += [topics[k].strip() for k in sorted(topics)]
    if source in ("docstrings", "both"):
        docs += list(_stdlib_docstrings())
    return tuple(d for d in docs if d)


def load_corpus(source: str = "pydoc") -> str:
    """All documents of a source joined by blank lines."""
    return "\n\n".join(load_documents(source))


def _stdlib_docstrings() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__")
                             and not d.startswith("."))
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        out.append(doc)
    return out


def train_val_split(docs: tuple[str, ...] | list[str], val_fraction: float = 0.1,
                    passage_chars: int = 2000) -> tuple[str, str]:
    """Cut the documents into passages of about `passage_chars` on paragraph boundaries; every
    k-th passage (k = round(1/val_fraction)) goes to validation, the rest to training."""
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    passages, current = [], []
    for doc in docs:
        for para in doc.split("\n\n"):
            current.append(para)
            if sum(map(len, current)) >= passage_chars:
                passages.append("\n\n".join(current))
                current = []
        if current:
            passages.append("\n\n".join(current))
            current = []
    if len(passages) < 2:
        raise ValueError(f"corpus too small to split: {len(passages)} passage(s); need at least 2")
    k = max(2, round(1 / val_fraction))
    train = [p for i, p in enumerate(passages) if i % k != k - 1]
    val = [p for i, p in enumerate(passages) if i % k == k - 1]
    return "\n\n".join(train), "\n\n".join(val)


# ----------------------------------------------------------------------------- tokenizers

class _Specials:
    pad_id, unk_id, cls_id, sep_id, mask_id = range(len(SPECIAL_TOKENS))
    special_ids = frozenset(range(len(SPECIAL_TOKENS)))

    @staticmethod
    def _check_text(text) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}"
                            + ("; decode bytes first, e.g. data.decode('utf-8')" if isinstance(text, bytes) else ""))

    def _check_id(self, i) -> int:
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return i


class CharTokenizer(_Specials):
    """One id per character; unseen characters map to [UNK]."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.stoi = {ch: i + len(SPECIAL_TOKENS) for i, ch in enumerate(self.chars)}
        self.itos = {i: ch for ch, i in self.stoi.items()} | dict(enumerate(SPECIAL_TOKENS))

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        if not text:
            raise ValueError("text must be non-empty to train a tokenizer")
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return [self.stoi.get(ch, self.unk_id) for ch in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[self._check_id(i)] for i in ids)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size}: {len(SPECIAL_TOKENS)} special + {len(self.chars)} characters)"


# GPT-2-like pre-tokenization: words keep their leading space; merges never cross word boundaries.
_PRETOKEN = re.compile(r"'(?:s|t|re|ve|m|ll|d)| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


class BPETokenizer(_Specials):
    """Byte-level BPE: ids 5..260 are bytes, then one id per learned merge (in merge order)."""

    def __init__(self, merges: list[tuple[int, int]]):
        self.merges = list(merges)
        offset = len(SPECIAL_TOKENS)
        self.ranks = {pair: offset + 256 + i for i, pair in enumerate(self.merges)}
        self.vocab: dict[int, bytes] = {offset + b: bytes([b]) for b in range(256)}
        for (a, b), new_id in self.ranks.items():
            self.vocab[new_id] = self.vocab[a] + self.vocab[b]
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, text: str, vocab_size: int = 512) -> "BPETokenizer":
        base = len(SPECIAL_TOKENS) + 256
        if not text:
            raise ValueError("text must be non-empty to train a tokenizer")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < base:
            raise ValueError(f"vocab_size must be an integer >= {base} (5 special + 256 bytes), got {vocab_size!r}")
        counts = Counter(_PRETOKEN.findall(text))
        words = [[len(SPECIAL_TOKENS) + b for b in w.encode("utf-8")] for w in counts]
        freqs = list(counts.values())
        pairs: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for wi, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freqs[wi]
                where.setdefault(p, set()).add(wi)
        merges = []
        for new_id in range(base, vocab_size):
            if not pairs:
                break
            best = max(pairs, key=lambda p: (pairs[p], -p[0], -p[1]))  # ties: smallest ids, deterministic
            if pairs[best] < 2:
                break
            merges.append(best)
            for wi in list(where.get(best, ())):
                w = words[wi]
                for p in zip(w, w[1:]):  # remove this word's old pairs
                    pairs[p] -= freqs[wi]
                    if pairs[p] <= 0:
                        del pairs[p]
                words[wi] = w = _merge(w, best, new_id)
                for p in zip(w, w[1:]):
                    pairs[p] += freqs[wi]
                    where.setdefault(p, set()).add(wi)
        return cls(merges)

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + 256 + len(self.merges)

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            ids = [len(SPECIAL_TOKENS) + b for b in word.encode("utf-8")]
            while len(ids) > 1:
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, float("inf")))
                if pair not in self.ranks:
                    break
                ids = _merge(ids, pair, self.ranks[pair])
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return [i for word in _PRETOKEN.findall(text) for i in self._encode_word(word)]

    def decode(self, ids) -> str:
        out = b""
        for i in ids:
            i = self._check_id(i)
            out += SPECIAL_TOKENS[i].encode() if i in self.special_ids else self.vocab[i]
        return out.decode("utf-8", errors="replace")

    def __repr__(self):
        return f"BPETokenizer(vocab_size={self.vocab_size}: 5 special + 256 bytes + {len(self.merges)} merges)"


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


# ----------------------------------------------------------------------------- datasets

@dataclass(repr=False)
class TextData:
    train: torch.Tensor  # (N_train,) token ids
    val: torch.Tensor  # (N_val,) token ids
    tokenizer: CharTokenizer | BPETokenizer
    source: str

    def batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator | None = None,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: x (B, T) and y = x shifted left by one (next-token targets)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        for name, v in (("batch_size", batch_size), ("block_size", block_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        data = self.train if split == "train" else self.val
        if len(data) <= block_size + 1:
            raise ValueError(f"block_size={block_size} is too long for the {split} split ({len(data)} tokens)")
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        offsets = torch.arange(block_size + 1)
        window = data[ix[:, None] + offsets]  # (B, T+1)
        x, y = window[:, :-1], window[:, 1:]
        if device is not None:
            x, y = x.to(device), y.to(device)
        return x, y

    def __repr__(self):
        return (f"TextData(source={self.source!r}, {self.tokenizer!r}, train={len(self.train):,} tokens, "
                f"val={len(self.val):,} tokens)")


@functools.lru_cache(maxsize=8)
def load_dataset(tokenizer: str = "char", source: str = "pydoc", vocab_size: int = 512,
                 val_fraction: float = 0.1) -> TextData:
    """Tokenized train/validation text. The tokenizer is trained on the training split only."""
    if tokenizer not in ("char", "bpe"):
        raise ValueError(f"tokenizer must be 'char' or 'bpe', got {tokenizer!r}")
    train_text, val_text = train_val_split(load_documents(source), val_fraction)
    tok = CharTokenizer.train(train_text) if tokenizer == "char" else BPETokenizer.train(train_text, vocab_size)
    as_tensor = lambda text: torch.tensor(tok.encode(text), dtype=torch.long)
    return TextData(as_tensor(train_text), as_tensor(val_text), tok, source)
