"""Block-sparse attention in plain PyTorch: compute only the kept (query block, key block) tiles.

    out_i = softmax_j( q_i . k_j / sqrt(d) , j in kept(i) ) v_j

For a layout (H, nb, nb) every query block gathers its kept key/value blocks into one contiguous
tensor, does one batched matmul, one softmax over all its kept keys, and one matmul with the values
(Gray, Radford & Kingma 2017, "GPU kernels for block-sparse weights"; Child et al. 2019). The
backward is autograd through those gathers and matmuls, so it works wherever PyTorch runs, including
CPU, where FlexAttention has no backward.

Rows are padded to a common number K of key blocks so one batched matmul serves them all. A few
rows (BigBird's global query blocks) keep every key block: padding every row to their length would
make the whole thing dense again, so rows with more than K blocks go through a dense path of
their own. K is chosen to minimise  K * #(rows with <= K blocks) + nb * #(rows with more).

Inside a kept tile the element mask is applied only where needed: causality on diagonal tiles,
keys beyond the real length (padding to a multiple of block_size), and the pattern's own mask_mod
for patterns that are finer than blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import MatmulAttention, attention_layers
from .patterns import SparsePattern


def _check_inputs(q, k, v, layout, block_size):
    if not (isinstance(block_size, int) and not isinstance(block_size, bool) and block_size > 0):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must all be (batch, heads, seq, head_dim) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share one dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if layout.dtype != torch.bool or layout.dim() not in (2, 3) or layout.size(-1) != layout.size(-2):
        raise ValueError(f"layout must be a bool tensor (heads, n_blocks, n_blocks) or (n_blocks, n_blocks), "
                         f"got {layout.dtype} {tuple(layout.shape)}")
    B, H, T, D = q.shape
    nb = math.ceil(T / block_size)
    if layout.size(-1) != nb:
        raise ValueError(f"block_size={block_size} with seq {T} needs a layout of {nb} blocks "
                         f"(seq padded to {nb * block_size}), got {layout.size(-1)}")
    if layout.dim() == 3 and layout.size(0) not in (1, H):
        raise ValueError(f"layout has {layout.size(0)} heads, q has {H}: heads must be 1 or equal")


def plan(layout: torch.Tensor, n_heads: int, causal: bool):
    """Which rows go sparse (padded to K blocks) and which dense, and the kept blocks per row.

    Returns dict(layout (H, nb, nb), K, sparse_rows (n_s,), kv_blocks (n_s, K), valid (n_s, K),
    dense_rows (n_d,), dense_blocks (H, n_max), masked (sparse rows with padding slots), fast, dense_full);
    rows are indices into the
    flattened (H * nb) query blocks.
    """
    L = layout if layout.dim() == 3 else layout.unsqueeze(0)
    H, nb = n_heads, L.size(-1)
    L = L.expand(H, nb, nb)
    if causal:
        L = L & torch.ones(nb, nb, dtype=torch.bool, device=L.device).tril()
    flat = L.reshape(H * nb, nb)  # (H*nb, nb)
    counts = flat.sum(-1)  # (H*nb,)
    sorted_counts = counts.sort().values
    n_rows = H * nb
    best_K, best_cost = nb, None
    for K in sorted_counts.unique().tolist():  # cost of padding to K; the longer rows go dense
        n_le = int(torch.searchsorted(sorted_counts, K, right=True))
        cost = K * n_le + nb * (n_rows - n_le)
        if best_cost is None or cost <= best_cost:
            best_K, best_cost = max(int(K), 1), cost
    K = best_K
    sparse_rows = (counts <= K).nonzero().flatten()
    dense_rows = (counts > K).nonzero().flatten()
    # padding slots first, then the kept blocks in increasing order: with a causal layout the
    # diagonal block is always the last slot, so causality is one tril on the last bs keys
    n_s = sparse_rows.numel()
    order = flat[sparse_rows].to(torch.uint8).argsort(dim=-1, stable=True)[:, nb - K:]  # (n_s, K)
    valid = torch.arange(K, device=L.device).view(1, K) >= (K - counts[sparse_rows]).view(-1, 1)  # (n_s, K)
    kv_blocks = torch.where(valid, order, order[:, -1:])  # padding slots repeat a kept block
    masked = (~valid.all(-1)).nonzero().flatten()  # sparse rows (positions) with padding slots
    diag_last = bool((kv_blocks[:, -1] == sparse_rows % nb).all()) if n_s else True
    fast = bool((counts[sparse_rows] > 0).all()) and (diag_last or not causal)
    # dense rows grouped by head, padded by repeating a row of the same head (same result twice)
    dense_blocks, dense_full = None, True
    if dense_rows.numel():
        per_head = [(dense_rows[dense_rows // nb == h] % nb) for h in range(H)]
        n_max = max(r.numel() for r in per_head)
        dense_blocks = torch.stack([torch.cat([r, r[-1:].expand(n_max - r.numel()) if r.numel() else
                                               torch.zeros(n_max, dtype=torch.long, device=L.device)])
                                    for r in per_head])  # (H, n_max)
        dense_full = bool(L.gather(1, dense_blocks.unsqueeze(-1).expand(H, n_max, nb)).all())
    return dict(layout=L, K=K, sparse_rows=sparse_rows, kv_blocks=kv_blocks, valid=valid, dense_rows=dense_rows,
                masked=masked, fast=fast, dense_blocks=dense_blocks, dense_full=dense_full)


def _element_keep(row_block, h, kpos, base_keep, T, bs, causal, mask_mod):
    """Refine a slot/block-level keep mask with causality, padding and mask_mod. -> (n, bs|1, keys)."""
    keep = base_keep & (kpos < T)  # (n, 1, keys)
    if not (causal or mask_mod is not None):
        return keep
    qpos = (row_block * bs).view(-1, 1, 1) + torch.arange(bs, device=kpos.device).view(1, bs, 1)  # (n, bs, 1)
    if causal:
        keep = keep & (kpos <= qpos)
    if mask_mod is not None:
        keep = keep & mask_mod(torch.zeros((), dtype=torch.long, device=kpos.device), h.view(-1, 1, 1), qpos, kpos)
    return keep


class _Attend(torch.autograd.Function):
    """out = softmax(mask(q k^T)) v over gathered keys, with a hand-written backward.

    q (B, n, rows, D) already scaled; k, v (B, n, keys, D). `mask_(s)` fills masked scores in place
    with the dtype's min (finite: no NaN gradients) and returns has_key (broadcastable to s[..., :1])
    or None; a query with no key at all outputs zeros, as FlexAttention does. Backward (FlashAttention's
    identity): dS = P * (dP - rowsum(dO * O)), so masked entries (P = 0) need no mask of their own,
    and dK = dS^T Q comes out contiguous, ready for the scatter-add into the key blocks.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask_, dropout_p):
        s = q @ k.transpose(-2, -1)  # (B, n, rows, keys)
        has_key = mask_(s) if mask_ is not None else None
        p = torch.softmax(s, dim=-1)
        if has_key is not None:
            p.mul_(has_key)
        drop = None
        if dropout_p > 0:
            drop = torch.rand_like(p) >= dropout_p
            out = (p * drop) @ v / (1 - dropout_p)
        else:
            out = p @ v  # (B, n, rows, D)
        ctx.save_for_backward(q, k, v, p, out, drop)
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p, out, drop = ctx.saved_tensors
        dout = dout.contiguous()
        if drop is None:
            dv = p.transpose(-2, -1) @ dout  # (B, n, keys, D)
            dp = dout @ v.transpose(-2, -1)  # (B, n, rows, keys)
        else:
            keep = drop / (1 - ctx.dropout_p)
            dv = (p * keep).transpose(-2, -1) @ dout
            dp = (dout @ v.transpose(-2, -1)).mul_(keep)
        delta = (dout * out).sum(-1, keepdim=True)  # (B, n, rows, 1) = rowsum(P * dP)
        ds = dp.sub_(delta).mul_(p)  # (B, n, rows, keys)
        dq = ds @ k  # (B, n, rows, D)
        dk = ds.transpose(-2, -1) @ q  # (B, n, keys, D)
        return dq, dk, dv, None, None


def _fill(s, keep):
    """Masked scores -> dtype min, in place. -> has_key or None when every query has a key."""
    s.masked_fill_(~keep, torch.finfo(s.dtype).min)
    has_key = keep.any(-1, keepdim=True)
    return None if bool(has_key.all()) else has_key


def block_sparse_attention(q, k, v, layout, block_size: int, causal: bool = False, mask_mod=None,
                           dropout_p: float = 0.0, scale: float | None = None, _plan=None):
    """Attention over the kept blocks of `layout` only. q, k, v: (B, H, T, D); layout: bool (H|1, nb, nb)
    with nb = ceil(T / block_size). `mask_mod(b, h, q_idx, kv_idx)` refines kept blocks per element;
    `causal` adds j <= i. Returns (B, H, T, D)."""
    _check_inputs(q, k, v, layout, block_size)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    B, H, T, D = q.shape
    bs = block_size
    nb = math.ceil(T / bs)
    P = nb * bs
    if P != T:  # pad the sequence to whole blocks; padded keys are masked, padded queries dropped
        q, k, v = (F.pad(t, (0, 0, 0, P - T)) for t in (q, k, v))
    pl = _plan or plan(layout.to(q.device), H, causal)
    L = pl["layout"]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    qb = (q * scale).reshape(B, H * nb, bs, D)  # (B, H*nb, bs, D)
    kb = k.reshape(B, H * nb, bs, D)
    vb = v.reshape(B, H * nb, bs, D)
    neg = torch.finfo(q.dtype).min
    outs, rows = [], []

    s_rows, K = pl["sparse_rows"], pl["K"]
    if s_rows.numel():  # each query block against its K gathered key blocks
        n_s = s_rows.numel()
        h = s_rows // nb  # (n_s,) head of each row
        gid = (h.view(-1, 1) * nb + pl["kv_blocks"]).flatten()  # (n_s*K,) key blocks in H*nb numbering
        kg = kb.index_select(1, gid).view(B, n_s, K * bs, D)  # (B, n_s, K*bs, D)
        vg = vb.index_select(1, gid).view(B, n_s, K * bs, D)
        fast = P == T and mask_mod is None and pl["fast"]

        def mask_sparse(s):  # s: (B, n_s, bs, K*bs)
            if not fast:  # general path: one element mask for every kept tile
                kpos = (pl["kv_blocks"] * bs).view(n_s, K, 1) + torch.arange(bs, device=q.device)  # (n_s, K, bs)
                base = pl["valid"].view(n_s, K, 1).expand(n_s, K, bs).reshape(n_s, 1, K * bs)
                return _fill(s, _element_keep(s_rows % nb, h, kpos.view(n_s, 1, K * bs), base, T, bs, causal, mask_mod))
            m = pl["masked"]
            if m.numel():  # only rows padded to K slots need their padding slots masked
                slot = pl["valid"][m].repeat_interleave(bs, dim=-1).view(-1, 1, K * bs)  # (n_m, 1, K*bs)
                s[:, m] = s[:, m].masked_fill(~slot, neg)
            if causal:  # the diagonal block is the last slot of every row
                s[..., -bs:].masked_fill_(~torch.ones(bs, bs, dtype=torch.bool, device=q.device).tril(), neg)
            return None
        outs.append(_Attend.apply(qb.index_select(1, s_rows), kg, vg, mask_sparse, dropout_p))  # (B, n_s, bs, D)
        rows.append(s_rows)

    d_idx = pl["dense_blocks"]  # (H, n_max) query blocks per head that attend (almost) everything
    if d_idx is not None:
        n_max = d_idx.size(1)
        d_rows = (torch.arange(H, device=q.device).view(H, 1) * nb + d_idx).flatten()  # (H*n_max,)
        qd = qb.index_select(1, d_rows).view(B, H, n_max * bs, D)  # (B, H, n_max*bs, D)
        full = P == T and mask_mod is None and not causal and pl["dense_full"]

        def mask_dense(s):  # s: (B, H, n_max*bs, P), no gather: the keys are k itself
            if full:
                return None
            base = L.gather(1, d_idx.unsqueeze(-1).expand(H, n_max, nb)).repeat_interleave(bs, dim=-1)  # (H, n_max, P)
            hh = torch.arange(H, device=q.device).repeat_interleave(n_max)
            keep = _element_keep(d_idx.flatten(), hh, torch.arange(P, device=q.device).view(1, 1, P),
                                 base.view(H * n_max, 1, P), T, bs, causal, mask_mod)  # (H*n_max, bs|1, P)
            keep = keep.view(H, n_max, -1, P)
            has_key = _fill(s.view(B, H, n_max, bs, P), keep)
            return None if has_key is None else has_key.expand(H, n_max, bs, 1).reshape(H, n_max * bs, 1)
        outs.append(_Attend.apply(qd, k, v, mask_dense, dropout_p).view(B, H * n_max, bs, D))
        rows.append(d_rows)

    where = torch.empty(H * nb, dtype=torch.long, device=q.device)
    where[torch.cat(rows)] = torch.arange(sum(r.numel() for r in rows), device=q.device)
    out = torch.cat(outs, dim=1).index_select(1, where).view(B, H, P, D)  # (B, H, P, D)
    return out if P == T else out[:, :, :T]


class BlockSparseAttention(nn.Module):
    """Attention core for `course.model.set_attention`: core(q, k, v, causal, attn_mask, dropout_p).

    `pattern` is a SparsePattern (used for sequences up to its seq_len: shorter ones take the leading
    blocks), a function seq_len -> SparsePattern (built once per length), or a bool layout tensor
    together with `block_size`. With an explicit attn_mask the core falls back to dense masked SDPA
    (correct, not sparse-fast): the block path handles the pattern, causality and padding only.
    """

    def __init__(self, pattern, block_size: int | None = None):
        super().__init__()
        if isinstance(pattern, torch.Tensor):
            if block_size is None:
                raise ValueError("block_size is required when pattern is a layout tensor")
            layout = pattern if pattern.dim() == 3 else pattern.unsqueeze(0)
            from .patterns import _lookup
            pattern = SparsePattern("layout", layout.size(-1) * block_size, block_size, layout,
                                    _lookup(layout, block_size), block_exact=True, causal=False)
        elif not (isinstance(pattern, SparsePattern) or callable(pattern)):
            raise ValueError(f"pattern must be a SparsePattern, a function seq_len -> SparsePattern or a "
                             f"layout tensor, got {type(pattern).__name__}")
        self.pattern = pattern
        self._cache: dict = {}

    def pattern_for(self, T: int) -> SparsePattern:
        if T not in self._cache:
            p = self.pattern
            if not isinstance(p, SparsePattern):
                p = p(T)
            elif T > p.seq_len:
                raise ValueError(f"sequence length {T} exceeds the pattern's seq_len={p.seq_len}")
            elif T < p.seq_len:
                nb = math.ceil(T / p.block_size)
                p = SparsePattern(p.name, T, p.block_size, p.layout[:, :nb, :nb], p.mask_mod, p.block_exact, p.causal)
            self._cache[T] = p
        return self._cache[T]

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        # q, k, v: (B, nh, T, hs)
        p = self.pattern_for(q.size(-2))
        if p.n_heads not in (1, q.size(1)):
            raise ValueError(f"the pattern {p.name!r} has a layout for {p.n_heads} heads, but this attention layer has "
                             f"{q.size(1)}: build it with n_heads=1 (shared) or n_heads={q.size(1)}")
        causal = causal or p.causal
        if attn_mask is not None:
            mask = p.dense_mask(q.size(1)).to(q.device) & attn_mask
            if causal:
                mask = mask & torch.ones(mask.shape[-2:], dtype=torch.bool, device=q.device).tril()
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        key = (q.size(1), causal, str(q.device))
        if self._cache.get(("plan", q.size(-2)) + key) is None:
            self._cache[("plan", q.size(-2)) + key] = plan(p.layout.to(q.device), q.size(1), causal)
        return block_sparse_attention(q, k, v, p.layout, p.block_size, causal=causal,
                                      mask_mod=None if p.block_exact else p.mask_mod, dropout_p=dropout_p,
                                      _plan=self._cache[("plan", q.size(-2)) + key])

    def extra_repr(self) -> str:
        return repr(self.pattern) if isinstance(self.pattern, SparsePattern) else "pattern=<per length>"


class _MaskedWeights(MatmulAttention):
    """Dense attention with a fixed pattern mask that keeps its weights (for pictures)."""

    def __init__(self, mask):
        super().__init__(keep_weights=True)
        self.mask = mask

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        mask = self.mask.to(q.device) if self.mask is not None else None
        if attn_mask is not None:
            mask = attn_mask if mask is None else mask & attn_mask
        return super().forward(q, k, v, causal, mask, dropout_p)


@torch.no_grad()
def sparse_attention_maps(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Attention weights (n_layer, B, n_head, T, T) of a model whose layers may have sparse cores:
    each layer's weights are computed densely under that layer's own pattern mask."""
    layers = attention_layers(model)
    saved = [layer.core for layer in layers]
    was_training = model.training
    T = idx.size(1)
    try:
        model.eval()
        for layer in layers:
            core = layer.core
            mask = core.pattern_for(T).dense_mask(layer.n_head) if isinstance(core, BlockSparseAttention) else None
            layer.core = _MaskedWeights(mask)
        model(idx)
        return torch.stack([layer.core.weights for layer in layers])
    finally:
        for layer, core in zip(layers, saved):
            layer.core = core
        model.train(was_training)
