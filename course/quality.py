"""Data quality: a document filter with exact and near deduplication and Gopher's quality rules.

`filter_documents(docs)` removes exact duplicates (hash of whitespace-normalized text), near duplicates
(MinHash over hashed 5-word shingles with LSH banding, then the exact Jaccard similarity of the
candidate pairs), and Gopher's quality rules (Rae et al. 2021, "Scaling Language Models: Methods,
Analysis & Insights from Training Gopher", appendix A, MassiveWeb quality filters: 50..100,000
words, mean word length 3..10, symbol-to-word ratio <= 0.1, <= 90 % bullet lines, <= 30 % lines
ending in an ellipsis, >= 80 % of words with a letter, >= 2 of 8 stop words). GPT-3 (Brown et al.
2020, appendix A) fuzzily deduplicated each dataset with Spark's MinHashLSH (10 hashes), which
removed ~10 % of the data, after filtering Common Crawl with a quality classifier (not done here:
it needs a reference corpus of "good" text to train on).
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

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
