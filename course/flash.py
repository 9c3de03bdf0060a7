"""Memory-efficient exact attention in plain PyTorch: FlashAttention-2's algorithm (Dao 2023).

    out = flash_attention(q, k, v, causal=True, block_q=128, block_k=128, dropout_p=0.1, seed=7)

Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (2023),
Algorithm 1 (forward) and Algorithm 2 (backward); the online softmax and the recomputation idea are
from FlashAttention (Dao et al. 2022, sections 3.1 and 3.2). Never forms an s x s tensor:

forward (Algorithm 1): for each query tile Q_i (block_q rows), over key tiles K_j, V_j (block_k):
    S = Q_i K_j^T / sqrt(d);  m' = max(m, rowmax S);  P = exp(S - m')
    l = e^(m - m') l + rowsum P;  O_i = e^(m - m') O_i + P V_j;  m = m'
    then O_i = O_i / l and L_i = m + log l (one log-sum-exp per query row).
backward (Algorithm 2): D = rowsum(dO * O); for each key tile j, over query tiles i:
    P = exp(Q_i K_j^T / sqrt(d) - L_i)   (the scores recomputed, not stored)
    dV_j += P^T dO_i;  dP = dO_i V_j^T;  dS = P * (dP - D_i);  dQ_i += dS K_j;  dK_j += dS^T Q_i.

Saved for backward: q, k, v (the inputs as given: in the model, views of c_attn's output), O and
L (B, H, T) in float32 (float64 for float64 inputs): nothing of size s^2; temporaries are one
(B*H, block_q, block_k) tile. O is laid out (B, T, H, D) like SDPA's, so the model's
transpose(1, 2).contiguous() before c_proj is free and c_proj's saved input shares O's storage.

Tiles are skipped where nothing is kept: above the diagonal when causal, and the tiles a block-sparse
layout (course.sparse) drops (block-sparse FlashAttention, Dao et al. 2022 section 3.3), so
block-sparse attention keeps the same O(T) memory. Inside a kept
tile an element mask is applied only where needed (diagonal tiles, a pattern's mask_mod, attn_mask,
heads whose layout drops the tile). A query with no key at all outputs 0 (FlexAttention's rule).

Dropout without a stored mask (FlashAttention, Dao et al. 2022, Algorithms 2 and 4: forward saves the
RNG state, backward regenerates the mask from it; on a GPU the generator is Philox):
element (b, h, i, j) is dropped iff a keyed hash of the counter j is below p * 2^32, with the key
derived from (seed, b, h, i) by SplitMix64 (Steele et al. 2014). The hash is a counter-based
generator in the style of Philox (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3"):
multiply, xorshift, multiply with the multipliers of Wellons' "lowbias32" hash, the row keys injected
before each multiply; the comparison reads mostly the product's top bits, so lowbias32's final
xorshift (which mixes them into the low bits) is left out. Any tile of the mask is a pure function
of (seed, coordinates), so backward regenerates exactly the forward's masks in any order, the mask
does not depend on the tile sizes, and `dropout_keep` builds the same mask densely for the reference. It is 8 vectorized int32 ops
per element; torch's bernoulli_ draws from a stateful generator one element at a time on CPU,
which is what made regenerating dropout masks slow in lesson 04.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .model import MatmulAttention, SDPAttention

__all__ = ["flash_attention", "FlashAttention", "computed_tiles", "dropout_keep"]


def flash_attention(q, k, v, causal: bool = False, *, block_q: int = 128, block_k: int = 128, layout=None,
                    mask_mod=None, attn_mask=None, dropout_p: float = 0.0, seed: int = 0, scale: float | None = None):
    """Exact attention, tile by tile. q, k, v: (B, H, T, D), one shape, dtype and device -> (B, H, T, D).

    layout: bool (H|1, ceil(T/block_q), ceil(T/block_k)), tile (i, j) computed iff True (per head);
    mask_mod(b, h, q_idx, kv_idx) refines kept tiles per element; attn_mask: bool broadcastable to
    (B, H, T, T), True = attend; dropout_p with `seed` (same seed, same masks); scale: 1/sqrt(D)."""
    cfg = _config(q, k, v, causal, block_q, block_k, layout, mask_mod, attn_mask, dropout_p, seed, scale)
    return _Flash.apply(q, k, v, attn_mask, cfg)


# ----------------------------------------------------------------------------- dropout: a counter-based hash

_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # SplitMix64
_LOWBIAS = (0x7FEB352D, 0x846CA68B)  # Wellons' lowbias32 multipliers


def _i64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c  # the same 64 bits as a signed int64


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 (products wrap mod 2^64; & emulates unsigned right shifts)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _i64(_MIX1)
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _i64(_MIX2)
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _mix(z: int) -> int:
    """_splitmix64 on one Python integer (mod 2^64)."""
    z = ((z ^ (z >> 30)) * _MIX1) % (1 << 64)
    z = ((z ^ (z >> 27)) * _MIX2) % (1 << 64)
    return z ^ (z >> 31)


def _row_keys(seed: int, B: int, H: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int32 keys per query row r = (b H + h) T + i: the r-th output of a SplitMix64 stream that starts at
    a hash of the seed (so seeds 0, 1, 2 give unrelated streams). Each (B*H, T, 1)."""
    start = _mix((seed * _GOLDEN) % (1 << 64))
    row = torch.arange(B * H * T, dtype=torch.int64, device=device).view(B * H, T, 1)
    z = _splitmix64(row * _i64(_GOLDEN) + _i64(start))
    lo, hi = z & 0xFFFFFFFF, (z >> 32) & 0xFFFFFFFF
    return ((lo ^ 0x80000000) - 0x80000000).to(torch.int32), ((hi ^ 0x80000000) - 0x80000000).to(torch.int32)


def _dropped(k1, k2, j0: int, j1: int, threshold: int) -> torch.Tensor:
    """True where element (row, j) is dropped, j in [j0, j1). k1, k2: (n, rows, 1) int32 -> (n, rows, j1-j0)."""
    x = k1 ^ torch.arange(j0, j1, dtype=torch.int32, device=k1.device)  # the counter, keyed
    x = x * _LOWBIAS[0]  # int32 products wrap mod 2^32
    x = (x ^ ((x >> 15) & 0x1FFFF)) ^ k2  # & 0x1FFFF: an unsigned shift; the second key
    x = x * (_LOWBIAS[1] - (1 << 32))  # the top bits, which decide x < threshold, now depend on every input bit
    return x < threshold  # x is uniform on [-2^31, 2^31): P(drop) = round(p 2^32) / 2^32


def _threshold(p: float) -> int:
    return round(p * 2**32) - 2**31


def dropout_keep(seed: int, B: int, H: int, T: int, p: float, device=None) -> torch.Tensor:
    """The kernel's dropout mask, built densely: (B, H, T, T) bool, True = kept. For references and pictures."""
    k1, k2 = _row_keys(seed, B, H, T, device)
    return ~_dropped(k1, k2, 0, T, _threshold(p)).view(B, H, T, T)


# ----------------------------------------------------------------------------- the tile plan


@dataclass(frozen=True)
class _Config:
    B: int
    H: int
    T: int
    bq: int
    bk: int
    causal: bool
    tiles: tuple  # per query tile i: ((j, head_keep or None, needs_mask), ...) in increasing j
    mask_mod: object
    p: float
    seed: int
    scale: float


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def computed_tiles(T: int, block_q: int, block_k: int, causal: bool = False, layout=None) -> torch.Tensor:
    """(nq, nk) bool: the tiles the kernel computes (for some head); the others are skipped."""
    nq, nk = math.ceil(T / block_q), math.ceil(T / block_k)
    tiles = torch.ones(nq, nk, dtype=torch.bool) if layout is None else layout.cpu().any(0)
    if causal:  # tile (i, j) has a key at or before a query iff its first key <= its last query
        last_q = torch.clamp(torch.arange(1, nq + 1) * block_q, max=T) - 1
        tiles = tiles & (torch.arange(nk).view(1, nk) * block_k <= last_q.view(nq, 1))
    return tiles


def _config(q, k, v, causal, bq, bk, layout, mask_mod, attn_mask, p, seed, scale) -> _Config:
    _positive_int("block_q", bq)
    _positive_int("block_k", bk)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point tensor (batch, heads, seq, head_dim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not (q.shape == k.shape == v.shape) or not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must have one shape, dtype and device, got {tuple(q.shape)} {q.dtype} {q.device}, "
                         f"{tuple(k.shape)} {k.dtype} {k.device}, {tuple(v.shape)} {v.dtype} {v.device}")
    if not (isinstance(p, (int, float)) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    B, H, T, D = q.shape
    nq, nk = math.ceil(T / bq), math.ceil(T / bk)
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.dim() > 4:
            raise ValueError("attn_mask must be a bool tensor (True = attend) broadcastable to (B, H, T, T)")
        try:
            torch.broadcast_shapes(attn_mask.shape, (B, H, T, T))
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {(B, H, T, T)}") from None
    if layout is None:
        keep = torch.ones(1, nq, nk, dtype=torch.bool)
    else:
        if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool or layout.dim() != 3:
            raise ValueError(f"layout must be a bool tensor (heads, n_query_tiles, n_key_tiles), got "
                             f"{layout.dtype if isinstance(layout, torch.Tensor) else type(layout).__name__}")
        if layout.shape[1:] != (nq, nk) or layout.size(0) not in (1, H):
            raise ValueError(f"layout {tuple(layout.shape)} does not match the tiles: T={T} with block_q={bq}, "
                             f"block_k={bk} needs (1 or {H}, {nq}, {nk})")
        keep = layout.cpu()
    tiles, computed, all_heads = [], computed_tiles(T, bq, bk, causal, keep).tolist(), keep.all(0).tolist()
    for i in range(nq):
        i0, i1 = i * bq, min((i + 1) * bq, T)
        row = []
        for j in range(nk):
            j0, j1 = j * bk, min((j + 1) * bk, T)
            if not computed[i][j]:
                continue  # nothing kept in this tile: skipped, forward and backward
            head_keep = None if all_heads[i][j] else keep[:, i, j].expand(H).repeat(B).view(B * H, 1, 1).to(q.device)
            partial = (causal and j1 - 1 > i0) or head_keep is not None or mask_mod is not None or attn_mask is not None
            row.append((j, head_keep, partial))
        tiles.append(tuple(row))
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _Config(B, H, T, bq, bk, causal, tuple(tiles), mask_mod, float(p), seed, scale)


def _tile_keep(cfg: _Config, attn_mask, i0, i1, j0, j1, head_keep, device):
    """Element mask of one kept tile, (B*H | 1, rows, cols) bool, True = attend."""
    keep = None
    if cfg.causal and j1 - 1 > i0:
        keep = (torch.arange(i0, i1, device=device).view(1, -1, 1) >= torch.arange(j0, j1, device=device))
    if head_keep is not None:
        keep = head_keep if keep is None else keep & head_keep
    if cfg.mask_mod is not None or attn_mask is not None:
        B, H = cfg.B, cfg.H
        m = torch.ones(B, H, i1 - i0, j1 - j0, dtype=torch.bool, device=device)
        if cfg.mask_mod is not None:
            b, h = torch.arange(B, device=device).view(B, 1, 1, 1), torch.arange(H, device=device).view(1, H, 1, 1)
            qi = torch.arange(i0, i1, device=device).view(1, 1, -1, 1)
            m = m & cfg.mask_mod(b, h, qi, torch.arange(j0, j1, device=device).view(1, 1, 1, -1))
        if attn_mask is not None:
            m = m & attn_mask.expand(B, H, cfg.T, cfg.T)[:, :, i0:i1, j0:j1]
        m = m.reshape(B * H, i1 - i0, j1 - j0)
        keep = m if keep is None else keep & m
    return keep


# ----------------------------------------------------------------------------- the kernel


def _work(t: torch.Tensor, B: int, H: int, T: int, D: int, mul: float = 1.0) -> torch.Tensor:
    """(B, H, T, D) -> contiguous (B*H, T, D) in the compute dtype (float32 for 16-bit inputs), never written to."""
    dt = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    t = t.to(dt) * mul if mul != 1.0 else t.to(dt)
    return t.reshape(B * H, T, D).contiguous()


class _Flash(torch.autograd.Function):
    """FlashAttention-2 forward (Algorithm 1) and backward (Algorithm 2). Saves q, k, v, O, L."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, cfg: _Config):
        B, H, T, D = q.shape
        bq, bk, dev = cfg.bq, cfg.bk, q.device
        qs, kw, vw = _work(q, B, H, T, D, cfg.scale), _work(k, B, H, T, D), _work(v, B, H, T, D)
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=dev).transpose(1, 2)  # (B, H, T, D), SDPA's layout
        lse = torch.empty(B * H, T, 1, dtype=qs.dtype, device=dev)
        if cfg.p > 0:
            k1, k2 = _row_keys(cfg.seed, B, H, T, dev)
            thr = _threshold(cfg.p)
        for i, row in enumerate(cfg.tiles):  # Algorithm 1: each query tile independently (parallel on a GPU)
            i0, i1 = i * bq, min((i + 1) * bq, T)
            q_i = qs[:, i0:i1]  # (BH, Br, D)
            m = torch.full((B * H, i1 - i0, 1), -math.inf, dtype=qs.dtype, device=dev)  # running max
            l = torch.zeros_like(m)  # running sum of exp(s - m)
            acc = torch.zeros(B * H, i1 - i0, D, dtype=qs.dtype, device=dev)  # unnormalised output
            for j, head_keep, partial in row:
                j0, j1 = j * bk, min((j + 1) * bk, T)
                s = torch.bmm(q_i, kw[:, j0:j1].transpose(1, 2))  # (BH, Br, Bc) scores
                if partial:
                    s.masked_fill_(~_tile_keep(cfg, attn_mask, i0, i1, j0, j1, head_keep, dev), -math.inf)
                m_new = torch.maximum(m, s.amax(-1, keepdim=True))
                m_sub = m_new.masked_fill(m_new == -math.inf, 0.0)  # no key yet: exp(-inf - 0) = 0, not NaN
                p = s.sub_(m_sub).exp_()  # (BH, Br, Bc)
                alpha = (m - m_sub).exp_()  # rescales what the earlier tiles summed
                l.mul_(alpha).add_(p.sum(-1, keepdim=True))
                if cfg.p > 0:  # dropout after the softmax: l sums the undropped p
                    p.masked_fill_(_dropped(k1[:, i0:i1], k2[:, i0:i1], j0, j1, thr), 0.0)
                acc.mul_(alpha).baddbmm_(p, vw[:, j0:j1])
                m = m_new
            empty = l == 0  # a query with no key at all: output 0, L = +inf (backward's P = 0)
            o = acc / l.masked_fill(empty, 1.0) / (1 - cfg.p)
            out[:, :, i0:i1] = o.view(B, H, i1 - i0, D).to(q.dtype)
            lse[:, i0:i1] = (m + l.log()).masked_fill_(empty, math.inf)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        cfg = ctx.cfg
        B, H, T, D = q.shape
        bq, bk, dev = cfg.bq, cfg.bk, q.device
        qs, kw, vw = _work(q, B, H, T, D, cfg.scale), _work(k, B, H, T, D), _work(v, B, H, T, D)
        do = _work(dout, B, H, T, D)
        delta = (do * _work(out, B, H, T, D)).sum(-1, keepdim=True)  # (BH, T, 1): D = rowsum(dO * O)
        dk, dv = torch.zeros_like(kw), torch.zeros_like(vw)  # key tiles no query visits stay 0
        dq = [torch.zeros(B * H, min(bq, T - i0), D, dtype=qs.dtype, device=dev) for i0 in range(0, T, bq)]
        c = 1.0 / (1 - cfg.p)  # dropout's rescaling
        if cfg.p > 0:
            k1, k2 = _row_keys(cfg.seed, B, H, T, dev)
            thr = _threshold(cfg.p)
        by_key = {}  # the same tiles, key tile outermost
        for i, row in enumerate(cfg.tiles):
            for j, head_keep, partial in row:
                by_key.setdefault(j, []).append((i, head_keep, partial))
        for j, col in sorted(by_key.items()):  # Algorithm 2: each key tile independently
            j0, j1 = j * bk, min((j + 1) * bk, T)
            k_j, v_j = kw[:, j0:j1], vw[:, j0:j1]
            dk_j, dv_j = torch.zeros_like(k_j), torch.zeros_like(v_j)  # contiguous: baddbmm_'s fast path
            for i, head_keep, partial in col:
                i0, i1 = i * bq, min((i + 1) * bq, T)
                q_i, do_i = qs[:, i0:i1], do[:, i0:i1]
                s = torch.baddbmm(-lse[:, i0:i1], q_i, k_j.transpose(1, 2))  # S - L: (BH, Br, Bc)
                if partial:
                    s.masked_fill_(~_tile_keep(cfg, attn_mask, i0, i1, j0, j1, head_keep, dev), -math.inf)
                p = s.exp_()  # P, recomputed from q, k and L
                dp = torch.baddbmm(-delta[:, i0:i1], do_i, v_j.transpose(1, 2), alpha=c)  # dP - D
                if cfg.p > 0:
                    drop = _dropped(k1[:, i0:i1], k2[:, i0:i1], j0, j1, thr)
                    dv_j.baddbmm_(p.masked_fill(drop, 0.0).transpose(1, 2), do_i, alpha=c)
                    dp = torch.where(drop, -delta[:, i0:i1], dp)  # dropped: dP = 0
                else:
                    dv_j.baddbmm_(p.transpose(1, 2), do_i)
                ds = dp.mul_(p)  # dS = P * (dP - D)
                dq[i].baddbmm_(ds, k_j)
                dk_j.baddbmm_(ds.transpose(1, 2), q_i)  # q_i carries the scale already
            dk[:, j0:j1], dv[:, j0:j1] = dk_j, dv_j
        dq = torch.cat(dq, 1).mul_(cfg.scale)
        shape = (B, H, T, D)
        return dq.view(shape).to(q.dtype), dk.view(shape).to(k.dtype), dv.view(shape).to(v.dtype), None, None


# ----------------------------------------------------------------------------- the model's attention core


class FlashAttention(nn.Module):
    """Attention core for `course.model.set_attention` / `Plan(attention=...)`:
    core(q, k, v, causal, attn_mask=None, dropout_p=0.0) -> (B, nh, T, hs), computed by `flash_attention`.

    layout: None (dense), a bool tile layout (H|1, nq, nk), or block-sparse attention's pattern (a
    course.sparse SparsePattern or a function seq_len -> SparsePattern, as BlockSparseAttention takes:
    shorter sequences use its leading blocks, its mask_mod refines tiles unless it is block-exact).
    With a pattern the tiles are its blocks: block_q and block_k must be None or its block_size.
    dropout_seed: None draws a seed from torch's RNG at every call (torch.manual_seed reproduces a run,
    and torch.utils.checkpoint, which restores the RNG state, replays the same masks); an int gives
    the same masks at every call (tests, pictures).
    """

    def __init__(self, block_q: int | None = 128, block_k: int | None = 128, layout=None,
                 dropout_seed: int | None = None):
        super().__init__()
        from .sparse.block_sparse import BlockSparseAttention
        for name, b in (("block_q", block_q), ("block_k", block_k)):
            if b is not None:
                _positive_int(name, b)
        if dropout_seed is not None and (not isinstance(dropout_seed, int) or isinstance(dropout_seed, bool)):
            raise ValueError(f"dropout_seed must be None or an integer, got {dropout_seed!r}")
        self.block_q, self.block_k, self.dropout_seed = block_q, block_k, dropout_seed
        self.layout = layout if layout is None or isinstance(layout, torch.Tensor) else None
        self.sparse = None if layout is None or isinstance(layout, torch.Tensor) else BlockSparseAttention(layout)
        if self.sparse is not None and hasattr(layout, "block_size"):
            self._tiles(layout)  # a SparsePattern: check its blocks against the tiles now

    @classmethod
    def replacing(cls, core: nn.Module, block_q: int = 128, block_k: int = 128) -> "FlashAttention":
        """The flash core computing what `core` computes: dense for SDPA / written-out attention, the same
        pattern (tiles = its blocks) for course.sparse's BlockSparseAttention."""
        from .sparse.block_sparse import BlockSparseAttention
        if isinstance(core, FlashAttention):
            return core
        if type(core) in (SDPAttention, MatmulAttention):
            return cls(block_q, block_k)
        if isinstance(core, BlockSparseAttention):
            return cls(None, None, layout=core.pattern)
        raise ValueError(f"no flash equivalent of attention core {type(core).__name__}: set the core yourself "
                         "(Plan(attention=lambda i: FlashAttention(...)))")

    def _tiles(self, pattern) -> tuple[int, int]:
        bs = pattern.block_size
        if self.block_q not in (None, bs) or self.block_k not in (None, bs):
            raise ValueError(f"layout {pattern.name!r} has block_size={bs}: it matches the tiles only with block_q "
                             f"= block_k = {bs} (or None), got {self.block_q}, {self.block_k}")
        return bs, bs

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        bq, bk, layout, mask_mod = self.block_q or 128, self.block_k or 128, self.layout, None
        if self.sparse is not None:
            p = self.sparse.pattern_for(q.size(-2))  # (the leading blocks of) the pattern
            (bq, bk), causal = self._tiles(p), causal or p.causal
            layout, mask_mod = p.layout[:, :math.ceil(q.size(-2) / bq), :math.ceil(q.size(-2) / bq)], p.mask_mod
            mask_mod = None if p.block_exact else mask_mod
        seed = self.dropout_seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, ())) if dropout_p > 0 else 0
        return flash_attention(q, k, v, causal, block_q=bq, block_k=bk, layout=layout, mask_mod=mask_mod,
                               attn_mask=attn_mask, dropout_p=dropout_p, seed=seed)

    def extra_repr(self) -> str:
        return f"block_q={self.block_q}, block_k={self.block_k}{'' if self.sparse is None else ', block-sparse'}"
