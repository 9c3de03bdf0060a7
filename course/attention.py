"""Self-attention from scratch, its quadratic cost, and tools to look inside trained heads.

Scaled dot-product attention (Vaswani et al. 2017, eq. 1):

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + M) V

with M = 0 where a query may attend a key and -inf where it may not. A GPT uses the causal
mask (query i sees keys j <= i); BERT uses none (every token sees every token). The score
matrix Q K^T is T x T per head, so time and memory grow as O(T^2): the cost that sparse
attention (chapter 03) and FlashAttention-style kernels attack.

Lesson 01 calls `self_attention` (checked equal to F.scaled_dot_product_attention) and swaps
`ScratchAttention` into the model; its measurements and head summaries live in
`course.lessons.attention`. The causal triangle has one home, `course.model.causal_mask`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .model import causal_mask


def bidirectional_mask(T: int, device=None) -> torch.Tensor:
    """(T, T) bool, all True: BERT's encoder lets every token see every token."""
    if T <= 0:
        raise ValueError(f"T must be positive, got {T}")
    return torch.ones(T, T, dtype=torch.bool, device=device)


def softmax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(s - max) / sum exp(s - max): subtracting the row max changes nothing but avoids overflow."""
    if not scores.dtype.is_floating_point:
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    shifted = scores - scores.amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hs) + mask) v, written out. Returns (output, weights).

    q (B, nh, T, hs), k and v (B, nh, S, hs); attn_mask bool, True = may attend, broadcastable
    to (B, nh, T, S), ANDed with the causal triangle when causal=True.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, nh, T, hs), got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.size(-1) != k.size(-1):
        raise ValueError(f"q, k, v must agree on batch, heads and head size (k and v also on length), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    T, S = q.size(-2), k.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, S)
    allowed = causal_mask(T, S, q.device) if causal else None  # (T, S)
    if attn_mask is not None:
        allowed = attn_mask if allowed is None else attn_mask & allowed
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = softmax(scores, dim=-1)  # (B, nh, T, S), each row sums to 1
    return weights @ v, weights  # (B, nh, T, hs), (B, nh, T, S)


class ScratchAttention(nn.Module):
    """`self_attention` as a drop-in attention core for course.model (set_attention)."""

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        out, weights = self_attention(q, k, v, causal=causal, attn_mask=attn_mask)
        if dropout_p > 0:  # dropout on the weights, as in the paper; matches SDPA's semantics
            out = torch.nn.functional.dropout(weights, p=dropout_p) @ v
        return out
