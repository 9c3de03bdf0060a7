"""What a pattern costs: kept score entries, FLOPs and bytes, dense vs sparse.

Per head, attention over n kept (query, key) pairs with head dim d costs
    forward   4 n d  FLOPs  (S = Q K^T: 2 n d, O = P V: 2 n d)
    backward  8 n d  FLOPs  (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 2 n d each)
so training costs 12 n d; dense attention has n = T^2 (causal: T(T+1)/2, counted as T^2 by
kernels that compute whole tiles). The block kernel computes whole kept tiles: n = kept_blocks * b^2.
Bytes: the scores/probabilities a non-fused kernel keeps for backward (n entries) plus, for the
gather-based kernel, the gathered keys and values (2 * rows * K * b * d).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..costs import attention_pair_flops
from .block_sparse import plan
from .patterns import SparsePattern


@dataclass
class AttentionCost:
    seq_len: int
    n_heads: int
    head_dim: int
    dense_entries: int  # T*T*H score entries
    sparse_entries: int  # kept tiles * b^2 * H (what the block kernel computes)
    exact_entries: int | None  # kept elements of the exact mask (None: not counted)
    dense_flops: float  # forward + backward, 12 n d
    sparse_flops: float
    dense_score_bytes: int
    sparse_bytes: int  # scores + gathered K, V of the block kernel

    @property
    def density(self) -> float:
        return self.sparse_entries / self.dense_entries

    @property
    def flop_ratio(self) -> float:
        return self.dense_flops / self.sparse_flops

    def __repr__(self) -> str:
        return (f"AttentionCost(T={self.seq_len}, H={self.n_heads}, d={self.head_dim}: tiles keep "
                f"{self.density:.1%} of the scores, fwd+bwd {self.sparse_flops / 1e9:.2f} vs dense "
                f"{self.dense_flops / 1e9:.2f} GFLOP ({self.flop_ratio:.1f}x fewer), memory "
                f"{self.sparse_bytes / 2**20:.1f} vs {self.dense_score_bytes / 2**20:.1f} MiB)")


def attention_cost(pattern: SparsePattern, n_heads: int = 4, head_dim: int = 64, batch: int = 1,
                   bytes_per_el: int = 4, causal: bool | None = None, exact: bool = False) -> AttentionCost:
    """Dense vs block-sparse cost of one attention call (fwd + bwd) for this pattern."""
    if n_heads % pattern.n_heads:
        raise ValueError(f"n_heads={n_heads} must be a multiple of the pattern's heads ({pattern.n_heads})")
    causal = pattern.causal if causal is None else causal
    T, bs, nb = pattern.seq_len, pattern.block_size, pattern.n_blocks
    L = pattern.layout.expand(n_heads, nb, nb)
    if causal:
        L = L & torch.ones(nb, nb, dtype=torch.bool).tril()
    tiles = int(L.sum())
    dense_n = batch * n_heads * T * T
    sparse_n = batch * tiles * bs * bs
    pl = plan(L, n_heads, causal)
    gathered = batch * (pl["sparse_rows"].numel() * pl["K"] * bs * head_dim * 2)
    exact_n = None
    if exact:
        exact_n = batch * int(round(pattern.density() * pattern.n_heads * T * T)) * (n_heads // pattern.n_heads)
    return AttentionCost(T, n_heads, head_dim, dense_n, sparse_n, exact_n, attention_pair_flops(dense_n, head_dim),
                         attention_pair_flops(sparse_n, head_dim), dense_n * bytes_per_el, (sparse_n + gathered) * bytes_per_el)
