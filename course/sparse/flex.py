"""FlexAttention (Dong et al. 2024, torch.nn.attention.flex_attention) from the same block layout.

`block_mask(pattern)` builds the BlockMask straight from the layout: `kv_num_blocks` / `kv_indices`
list the kept key blocks of every query block, split into *full* blocks (every element kept: no
mask_mod call) and *partial* ones (diagonal blocks under causality, padded tails, and every block of
a pattern finer than blocks), so no dense T x T mask is ever formed (create_block_mask would evaluate
mask_mod on all T*T pairs). Compiled flex_attention runs forward on CPU and forward + backward on
GPU; eager flex materializes the scores (correct, slow). On CPU it has no backward: train with
`block_sparse_attention` there.
"""
from __future__ import annotations


import torch

from .patterns import SparsePattern, _lookup, _with_causal

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # older torch
    BlockMask = flex_attention = None

_compiled = None


def flex_available() -> bool:
    """FlexAttention importable (compiling it also needs a C compiler on CPU, Triton on GPU)."""
    return flex_attention is not None


def _indices(blocks: torch.Tensor):
    """(H, nb, nb) bool -> kv_num_blocks (1, H, nb) int32, kv_indices (1, H, nb, nb) int32, kept first."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = (~blocks).to(torch.uint8).argsort(dim=-1, stable=True).to(torch.int32)
    return num.unsqueeze(0).contiguous(), idx.unsqueeze(0).contiguous()


def block_mask(pattern: SparsePattern, causal: bool | None = None, device=None) -> "BlockMask":
    """BlockMask of a pattern, built from its layout (no dense T x T mask)."""
    if not flex_available():
        raise RuntimeError("FlexAttention is not available in this torch version")
    causal = pattern.causal if causal is None else causal
    T, bs, nb = pattern.seq_len, pattern.block_size, pattern.n_blocks
    L = pattern.layout.to(device)  # (H, nb, nb)
    if causal:
        L = L & torch.ones(nb, nb, dtype=torch.bool, device=device).tril()
    partial = torch.zeros_like(L)
    if not pattern.block_exact:
        partial = L.clone()
    if causal:
        partial = partial | (L & torch.eye(nb, dtype=torch.bool, device=device))
    if nb * bs != T:  # the last block row/column is cut by the sequence end
        partial[:, -1, :] |= L[:, -1, :]
        partial[:, :, -1] |= L[:, :, -1]
    full = L & ~partial
    # eager flex evaluates mask_mod on every pair, compiled flex on partial blocks only: give the exact one
    mm = _lookup(L, bs) if pattern.block_exact else pattern.mask_mod
    if causal:
        mm = _with_causal(mm)
    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mm,
                                    seq_lengths=(T, T))


def flex_forward(q, k, v, bmask, compiled: bool = True):
    """flex_attention(q, k, v, block_mask); compiled once per process (first call per shape: seconds)."""
    global _compiled
    if not flex_available():
        raise RuntimeError("FlexAttention is not available in this torch version")
    if not compiled:
        return flex_attention(q, k, v, block_mask=bmask)
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled(q, k, v, block_mask=bmask)
