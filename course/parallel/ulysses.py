"""DeepSpeed-Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses: system optimizations for enabling
training of extreme long sequence transformer models", section 3): context parallelism by all-to-all.

Each of the N ranks holds T/N tokens with all H heads. Before attention one all-to-all trades
sequence for heads: afterwards each rank holds the *whole* sequence for H/N heads, and any attention
core runs on it unchanged (dense, causal, chapter 03's block-sparse kernel): no ring, no online
softmax, no load imbalance. A second all-to-all after attention trades back. Autograd: the adjoint of
an all-to-all is the reverse all-to-all, so backward moves the same bytes.

Per layer and rank, q, k, v and the output are each b·(T/N)·h elements, of which (N-1)/N leave the
rank: 4·b·T·h·(N-1)/N² forward, the same backward (`course.costs.ulysses_bytes`); the paper's
"4Nh/P" per link, which, unlike ring attention's, falls as N grows. The price: N must divide H.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def all_to_all(comm, x: torch.Tensor, scatter_dim: int, gather_dim: int, name: str = "") -> torch.Tensor:
    """Split x into N pieces along scatter_dim, piece j to rank j; concatenate what arrives along gather_dim."""
    if x.size(scatter_dim) % comm.world:
        raise ValueError(f"dimension {scatter_dim} of size {x.size(scatter_dim)} does not split over {comm.world} ranks")
    send = torch.stack(x.chunk(comm.world, dim=scatter_dim)).contiguous()  # (N, ...): piece j for rank j
    got = torch.empty_like(send)
    comm.all_to_all(got, send, name=name)
    return torch.cat(list(got), dim=gather_dim)  # pieces from ranks 0..N-1, in order


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, scatter_dim, gather_dim, name):
        ctx.args = comm, scatter_dim, gather_dim, name
        return all_to_all(comm, x, scatter_dim, gather_dim, name)

    @staticmethod
    def backward(ctx, grad):
        comm, scatter_dim, gather_dim, name = ctx.args
        return all_to_all(comm, grad, gather_dim, scatter_dim, f"{name} (backward)"), None, None, None, None


class UlyssesAttention(nn.Module):
    """Attention core: q, k, v (B, H, T/N, hs) of this rank's tokens -> all-to-all -> (B, H/N, T, hs)
    -> `core` -> all-to-all back -> (B, H, T/N, hs). The ranks' tokens must be contiguous chunks."""

    def __init__(self, comm, core: nn.Module):
        super().__init__()
        self.comm, self.core = comm, core

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        N, H = self.comm.world, q.size(1)
        if H % N:
            raise ValueError(f"Ulysses needs the number of heads ({H}) divisible by the context-parallel size ({N})")
        qkv = _AllToAll.apply(torch.stack([q, k, v]), self.comm, 2, 3, "q, k, v")  # (3, B, H/N, T, hs)
        if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.size(-3) == H > 1:
            attn_mask = attn_mask.narrow(-3, self.comm.rank * H // N, H // N)  # this rank's heads
        y = self.core(qkv[0], qkv[1], qkv[2], causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)
        return _AllToAll.apply(y, self.comm, 2, 1, "attention output")  # (B, H, T/N, hs)

    def extra_repr(self) -> str:
        return f"all-to-all over {self.comm.world} ranks"
