"""Sparse attention patterns, each one exposed three ways.

A pattern says which keys a query may attend. Every builder returns a `SparsePattern` with
- `mask_mod(b, h, q_idx, kv_idx) -> bool`: the exact per-element definition (FlexAttention's
  signature; works on broadcast index tensors),
- `layout`: a boolean block layout `(H, n_blocks, n_blocks)` (H = 1 when all heads share it): block
  (I, J) is kept iff some query of block I may attend some key of block J,
- `block_exact`: True when the layout expanded to elements *is* the mask (block-native patterns),
  so a kernel needs no per-element test except causality inside diagonal blocks.
`course.sparse.flex.block_mask(pattern)` turns the layout into a FlexAttention BlockMask.

Definitions (i = query position, j = key position, all 0-based):
- causal: j <= i.
- sliding_window(w): |i - j| <= w (causal: 0 <= i - j <= w). GPT-3's "locally banded" layers.
- dilated(w, d): |i - j| <= w*d and (i - j) mod d = 0 (Longformer, Beltagy et al. 2020, §3.1).
- global_tokens(g): i < g or j < g (tokens that attend everywhere and are attended from everywhere).
- random_blocks(r): each query block attends r key blocks drawn uniformly, seeded, per head.
- bigbird (Zaheer et al. 2020, ITC, block 64): a 3-block window (I-1, I, I+1), 2 global blocks
  (the first and the last block; causal: the first two), 3 random blocks per query block drawn from
  the blocks outside window and globals. Global query blocks attend everything.
- longformer(w, g) = sliding_window(w) | global_tokens(g) (Beltagy et al. 2020).
- strided(l) (Child et al. 2019, Sparse Transformer, autoregressive by definition):
  A1(i) = {j : max(0, i - l) <= j <= i},  A2(i) = {j : (i - j) mod l = 0, j <= i}.
- fixed(l, c) (Child et al. 2019): A1(i) = {j : floor(j/l) = floor(i/l)},
  A2(i) = {j : j mod l in {l - c, ..., l - 1}}, both with j <= i.
  For both Sparse Transformer patterns, `split=False` merges A1|A2 in every head ("merged head");
  `split=True` gives even heads A1 and odd heads A2 (the paper's "multi-head" variant).
- alternating_dense_banded: layer-wise list, dense causal on even layers and a causal local band
  on odd ones: GPT-3's "alternating dense and locally banded sparse attention patterns, similar to
  the Sparse Transformer" (Brown et al. 2020, §2.1). The source story's "local + global + random"
  is BigBird's pattern, not GPT-3's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _check_int(name: str, value, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


@dataclass
class SparsePattern:
    name: str
    seq_len: int
    block_size: int
    layout: torch.Tensor  # (H, nb, nb) bool, H = 1 when shared by all heads
    mask_mod: MaskMod = field(repr=False)
    block_exact: bool
    causal: bool

    @property
    def n_blocks(self) -> int:
        return self.layout.size(-1)

    @property
    def n_heads(self) -> int:
        return self.layout.size(0)

    def dense_mask(self, n_heads: int | None = None) -> torch.Tensor:
        """The element mask (H, T, T), True = attend. Materializes T*T bools: for tests and pictures."""
        H = n_heads or self.n_heads
        T = self.seq_len
        if self.block_exact:  # expand the tiles: no (H, T, T) int64 index tensors
            bs = self.block_size
            m = self.layout.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[:, :T, :T]
            if self.causal:
                m = m & torch.ones(T, T, dtype=torch.bool, device=m.device).tril()
            return m.expand(H, T, T).clone()
        h = torch.arange(H).view(H, 1, 1)
        i = torch.arange(T).view(1, T, 1)
        j = torch.arange(T).view(1, 1, T)
        return self.mask_mod(torch.zeros(()), h, i, j).expand(H, T, T).clone()

    def density(self) -> float:
        """Fraction of the T x T score matrix (per head, averaged) that is kept."""
        T, bs = self.seq_len, self.block_size
        if self.block_exact and not self.causal and T % bs == 0:
            return self.layout.float().mean().item()
        return _count_true(self.mask_mod, self.n_heads, T, bs) / (self.n_heads * T * T)

    def block_density(self) -> float:
        return self.layout.float().mean().item()

    def __repr__(self) -> str:
        return (f"SparsePattern({self.name}, seq_len={self.seq_len}, block_size={self.block_size}, "
                f"layout={tuple(self.layout.shape)}, block density {self.block_density():.3f})")


def _rows(H: int, T: int, bs: int):
    """Yield (start, i, h, j) index grids one query block at a time: never a dense T x T mask."""
    h = torch.arange(H).view(H, 1, 1)
    j = torch.arange(T).view(1, 1, T)
    for start in range(0, T, bs):
        i = torch.arange(start, min(start + bs, T)).view(1, -1, 1)
        yield start, i, h, j


def _count_true(mask_mod: MaskMod, H: int, T: int, bs: int) -> int:
    b = torch.zeros((), dtype=torch.long)
    return sum(int(mask_mod(b, h, i, j).expand(H, i.size(1), T).sum()) for _, i, h, j in _rows(H, T, bs))


def coverage_layout(mask_mod: MaskMod, seq_len: int, block_size: int, n_heads: int = 1) -> torch.Tensor:
    """Block layout (H, nb, nb) of any mask_mod: block kept iff any element is, one block row at a time."""
    nb = math.ceil(seq_len / block_size)
    pad = nb * block_size - seq_len
    b = torch.zeros((), dtype=torch.long)
    out = torch.zeros(n_heads, nb, nb, dtype=torch.bool)
    for start, i, h, j in _rows(n_heads, seq_len, block_size):
        m = mask_mod(b, h, i, j).expand(n_heads, i.size(1), seq_len)  # (H, rows, T)
        m = torch.nn.functional.pad(m, (0, pad))  # (H, rows, nb*bs)
        out[:, start // block_size] = m.view(n_heads, i.size(1), nb, block_size).any(-1).any(1)
    return out


def _lookup(layout: torch.Tensor, block_size: int) -> MaskMod:
    """mask_mod of a block-native layout: element (i, j) kept iff block (i // bs, j // bs) is."""
    shared = layout.size(0) == 1

    def mask_mod(b, h, q_idx, kv_idx):
        return layout[0 if shared else h, q_idx // block_size, kv_idx // block_size]
    return mask_mod


def _with_causal(mask_mod: MaskMod) -> MaskMod:
    def causal_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & (q_idx >= kv_idx)
    return causal_mod


def _check_common(seq_len, block_size):
    _check_int("seq_len", seq_len)
    _check_int("block_size", block_size)


def _from_mask_mod(name, mask_mod, seq_len, block_size, causal, n_heads=1) -> SparsePattern:
    if causal:
        mask_mod = _with_causal(mask_mod)
    layout = coverage_layout(mask_mod, seq_len, block_size, n_heads)
    return SparsePattern(name, seq_len, block_size, layout, mask_mod, block_exact=False, causal=causal)


def _from_layout(name, layout, seq_len, block_size, causal) -> SparsePattern:
    if causal:
        layout = layout & torch.ones_like(layout[0]).tril()
    mask_mod = _lookup(layout, block_size)
    if causal:
        mask_mod = _with_causal(mask_mod)
    return SparsePattern(name, seq_len, block_size, layout, mask_mod, block_exact=True, causal=causal)


# ----------------------------------------------------------------------------- the patterns

def dense(seq_len: int, block_size: int = 64, causal: bool = False) -> SparsePattern:
    _check_common(seq_len, block_size)
    nb = math.ceil(seq_len / block_size)
    return _from_layout("dense causal" if causal else "dense", torch.ones(1, nb, nb, dtype=torch.bool),
                        seq_len, block_size, causal)


def causal(seq_len: int, block_size: int = 64) -> SparsePattern:
    return dense(seq_len, block_size, causal=True)


def sliding_window(seq_len: int, window: int, block_size: int = 64, causal: bool = False) -> SparsePattern:
    """|i - j| <= window tokens (one side)."""
    _check_common(seq_len, block_size)
    _check_int("window", window, 0)
    if window >= seq_len:
        raise ValueError(f"window must be smaller than seq_len={seq_len}, got {window}")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() <= window
    return _from_mask_mod(f"sliding window {window}", mask_mod, seq_len, block_size, causal)


def dilated(seq_len: int, window: int, dilation: int, block_size: int = 64, causal: bool = False) -> SparsePattern:
    """|i - j| <= window*dilation and (i - j) divisible by dilation: `window` keys each side."""
    _check_common(seq_len, block_size)
    _check_int("window", window, 0)
    _check_int("dilation", dilation)
    if window * dilation >= seq_len:
        raise ValueError(f"window*dilation must be smaller than seq_len={seq_len}, got {window}*{dilation}")

    def mask_mod(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d.abs() <= window * dilation) & (d % dilation == 0)
    return _from_mask_mod(f"dilated {window}x{dilation}", mask_mod, seq_len, block_size, causal)


def global_tokens(seq_len: int, n_global: int, block_size: int = 64, causal: bool = False) -> SparsePattern:
    """The first n_global tokens attend everywhere and are attended from everywhere."""
    _check_common(seq_len, block_size)
    _check_int("n_global", n_global, 0)
    if n_global > seq_len:
        raise ValueError(f"n_global must be <= seq_len={seq_len}, got {n_global}")

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx < n_global) | (kv_idx < n_global)
    return _from_mask_mod(f"global {n_global}", mask_mod, seq_len, block_size, causal)


def _random_layout(nb, n_random, exclude, n_heads, generator) -> torch.Tensor:
    """(H, nb, nb): for each head and query block, n_random blocks among those not excluded."""
    layout = torch.zeros(n_heads, nb, nb, dtype=torch.bool)
    for h in range(n_heads):
        scores = torch.rand(nb, nb, generator=generator).masked_fill(exclude, 2.0)  # excluded sort last
        allowed = (~exclude).sum(-1)  # (nb,)
        pick = scores.argsort(dim=-1)[:, :n_random]  # (nb, r)
        keep = torch.arange(n_random).view(1, -1) < allowed.view(-1, 1)  # fewer candidates: take all
        layout[h].scatter_(1, pick, keep)
    return layout


def random_blocks(seq_len: int, n_random: int, block_size: int = 64, n_heads: int = 1, seed: int = 0,
                  causal: bool = False) -> SparsePattern:
    """Each query block attends n_random key blocks (plus itself), drawn per head with `seed`."""
    _check_common(seq_len, block_size)
    _check_int("n_heads", n_heads)
    _check_int("n_random", n_random, 0)
    nb = math.ceil(seq_len / block_size)
    if n_random > nb - 1:
        raise ValueError(f"n_random must be <= n_blocks - 1 = {nb - 1} (seq_len {seq_len}, block_size "
                         f"{block_size}), got {n_random}")
    eye = torch.eye(nb, dtype=torch.bool)
    exclude = eye | (torch.ones(nb, nb, dtype=torch.bool).triu(0) if causal else eye)
    gen = torch.Generator().manual_seed(seed)
    layout = _random_layout(nb, n_random, exclude, n_heads, gen) | eye
    return _from_layout(f"random {n_random}", layout, seq_len, block_size, causal)


def bigbird(seq_len: int, block_size: int = 64, window_blocks: int = 3, n_global_blocks: int = 2,
            n_random_blocks: int = 3, n_heads: int = 1, seed: int = 0, causal: bool = False) -> SparsePattern:
    """BigBird ITC (Zaheer et al. 2020): window + global + random blocks; defaults are the paper's."""
    _check_common(seq_len, block_size)
    _check_int("n_heads", n_heads)
    _check_int("window_blocks", window_blocks)
    _check_int("n_global_blocks", n_global_blocks, 0)
    _check_int("n_random_blocks", n_random_blocks, 0)
    if window_blocks % 2 == 0:
        raise ValueError(f"window_blocks must be odd (centred on the query block), got {window_blocks}")
    nb = math.ceil(seq_len / block_size)
    if window_blocks > nb:
        raise ValueError(f"window_blocks must be <= n_blocks = {nb}, got {window_blocks}")
    if n_global_blocks > nb:
        raise ValueError(f"n_global_blocks must be <= n_blocks = {nb}, got {n_global_blocks}")
    idx = torch.arange(nb)
    w = window_blocks // 2
    window = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= w  # (nb, nb)
    if causal:
        glob_ids = idx[:n_global_blocks]
    else:  # first and last blocks, as BigBird's ITC code places them
        glob_ids = torch.cat([idx[:n_global_blocks - n_global_blocks // 2], idx[nb - n_global_blocks // 2:]])
    is_glob = torch.zeros(nb, dtype=torch.bool)
    is_glob[glob_ids] = True
    glob = is_glob.view(-1, 1) | is_glob.view(1, -1)  # global rows and columns
    exclude = window | glob
    if causal:
        exclude = exclude | torch.ones(nb, nb, dtype=torch.bool).triu(1)
    limit = nb - window_blocks - n_global_blocks if not causal else nb - w - 1 - n_global_blocks
    if n_random_blocks > max(0, limit):
        raise ValueError(f"n_random_blocks must be <= {max(0, limit)}, the blocks outside window and globals "
                         f"(seq_len {seq_len}, block_size {block_size}), got {n_random_blocks}")
    gen = torch.Generator().manual_seed(seed)
    rand = _random_layout(nb, n_random_blocks, exclude, n_heads, gen)
    layout = (window | glob).unsqueeze(0) | rand  # (H, nb, nb)
    return _from_layout("bigbird", layout, seq_len, block_size, causal)


def longformer(seq_len: int, window: int, n_global: int, block_size: int = 64, causal: bool = False) -> SparsePattern:
    """Sliding window of `window` tokens each side plus `n_global` global tokens (Beltagy et al. 2020)."""
    return union(sliding_window(seq_len, window, block_size, causal),
                 global_tokens(seq_len, n_global, block_size, causal),
                 name=f"longformer w{window} g{n_global}")


def _split_heads(a1: MaskMod, a2: MaskMod, split: bool) -> MaskMod:
    if not split:
        return lambda b, h, q, k: a1(b, h, q, k) | a2(b, h, q, k)
    return lambda b, h, q, k: torch.where(h % 2 == 0, a1(b, h, q, k), a2(b, h, q, k))


def strided(seq_len: int, stride: int, block_size: int = 64, split: bool = False, n_heads: int = 2) -> SparsePattern:
    """Sparse Transformer strided pattern (Child et al. 2019, eq. in §4.2), causal."""
    _check_common(seq_len, block_size)
    _check_int("stride", stride)
    if stride > seq_len:
        raise ValueError(f"stride must be <= seq_len={seq_len}, got {stride}")
    a1 = lambda b, h, q, k: (q - k <= stride)  # t = max(0, i - l) <= j; j <= i comes from causality
    a2 = lambda b, h, q, k: ((q - k) % stride == 0)
    return _from_mask_mod(f"strided {stride}", _split_heads(a1, a2, split), seq_len, block_size, True,
                          n_heads if split else 1)


def fixed(seq_len: int, stride: int, c: int, block_size: int = 64, split: bool = False,
          n_heads: int = 2) -> SparsePattern:
    """Sparse Transformer fixed pattern (Child et al. 2019, §4.2), causal: own stride block + last c of each."""
    _check_common(seq_len, block_size)
    _check_int("stride", stride)
    _check_int("c", c)
    if stride > seq_len:
        raise ValueError(f"stride must be <= seq_len={seq_len}, got {stride}")
    if c > stride:
        raise ValueError(f"c must be <= stride={stride}, got {c}")
    a1 = lambda b, h, q, k: (q // stride == k // stride)
    a2 = lambda b, h, q, k: (k % stride >= stride - c)
    return _from_mask_mod(f"fixed {stride},{c}", _split_heads(a1, a2, split), seq_len, block_size, True,
                          n_heads if split else 1)


def union(*patterns: SparsePattern, name: str | None = None) -> SparsePattern:
    """Keys allowed by any of the patterns (same seq_len and block_size)."""
    if not patterns:
        raise ValueError("union needs at least one pattern")
    p0 = patterns[0]
    for p in patterns[1:]:
        if (p.seq_len, p.block_size, p.causal) != (p0.seq_len, p0.block_size, p0.causal):
            raise ValueError("patterns must share seq_len, block_size and causal to be combined")
    layout = patterns[0].layout
    for p in patterns[1:]:
        layout = layout | p.layout
    mods = [p.mask_mod for p in patterns]

    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out | m(b, h, q_idx, kv_idx)
        return out
    return SparsePattern(name or " | ".join(p.name for p in patterns), p0.seq_len, p0.block_size, layout,
                         mask_mod, all(p.block_exact for p in patterns), p0.causal)


def alternating_dense_banded(n_layer: int, seq_len: int, window: int, block_size: int = 64) -> list[SparsePattern]:
    """GPT-3's layer pattern: dense causal on even layers, a causal local band of `window` on odd layers."""
    _check_int("n_layer", n_layer)
    band = sliding_window(seq_len, window, block_size, causal=True)
    full = causal(seq_len, block_size)
    return [full if i % 2 == 0 else band for i in range(n_layer)]


PATTERNS = ("dense", "causal", "sliding_window", "dilated", "global_tokens", "random_blocks", "bigbird",
            "longformer", "strided", "fixed")


def make_pattern(name: str, seq_len: int, block_size: int = 64, window: int = 3, n_global: int = 2,
                 n_random: int = 3, n_heads: int = 1, seed: int = 0, causal: bool = False) -> SparsePattern:
    """One entry point with generic knobs (gallery, explorer). `window`, `n_global`, `n_random` count
    blocks as BigBird does; token-level patterns get a one-sided window of window*block_size//2 tokens
    (dilated: half as many keys, dilation 2), n_global*block_size global tokens; the Sparse Transformer
    patterns use stride l = window*block_size and c = block_size."""
    if name not in PATTERNS:
        raise ValueError(f"name must be one of {PATTERNS}, got {name!r}")
    _check_int("block_size", block_size)
    _check_int("window", window)
    tok_window = max(1, window * block_size // 2)
    if name == "dense":
        return dense(seq_len, block_size, causal)
    if name == "causal":
        return globals()["causal"](seq_len, block_size)
    if name == "sliding_window":
        return sliding_window(seq_len, tok_window, block_size, causal)
    if name == "dilated":
        return dilated(seq_len, max(1, tok_window // 2), 2, block_size, causal)
    if name == "global_tokens":
        return global_tokens(seq_len, n_global * block_size, block_size, causal)
    if name == "random_blocks":
        return random_blocks(seq_len, n_random, block_size, n_heads, seed, causal)
    if name == "bigbird":
        return bigbird(seq_len, block_size, window, n_global, n_random, n_heads, seed, causal)
    if name == "longformer":
        return longformer(seq_len, tok_window, n_global * block_size, block_size, causal)
    if name == "strided":
        return strided(seq_len, window * block_size, block_size)
    return fixed(seq_len, window * block_size, block_size, block_size)
