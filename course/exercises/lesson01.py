"""Lesson 01 (attention): the causal mask, a softmax that does not overflow, self-attention written out.

References: `course.model.causal_mask`, `course.attention.softmax`, `course.attention.self_attention`
(Vaswani et al. 2017, eq. 1). Comparisons run in float64: the claims are mathematical equalities, and
float64 rounding of these few operations stays below 1e-12 relative (the tolerance used).
"""
from __future__ import annotations

import math

import torch

from course.attention import self_attention, softmax
from course.model import causal_mask

from .core import Hint, call, close, exercise, expect_tensor, first_mask_difference, match_mistake

RTOL = 1e-12  # float64, a handful of operations: rounding is ~1e-16 per op


@exercise("01", "causal_mask", solution=causal_mask)
def check_causal_mask(fn, rng, gen):
    """causal_mask(T) -> (T, T) bool, True where query i may attend key j (j <= i)."""
    sizes = [1, 2, 5] + [rng.randint(3, 16) for _ in range(5)]
    for T in sizes:
        got = expect_tensor(call(fn, T), f"causal_mask({T})", shape=(T, T), dtype=torch.bool)
        first_mask_difference(
            got, causal_mask(T),
            extra=lambda i, j: f"your mask lets token {i} see token {j} (T={T}): a token may only look at itself "
                               f"and earlier tokens, j <= i",
            missing=lambda i, j: f"your mask hides token {j} from token {i} (T={T}): "
                                 f"{'a token must see itself' if i == j else 'earlier tokens must stay visible'}")
    return f"{len(sizes)} sizes"


@exercise("01", "softmax", solution=softmax)
def check_softmax(fn, rng, gen):
    """softmax(scores, dim=-1): exp(s - max) / sum exp(s - max) along `dim`, without overflow."""
    cases = [([2, 3, 4], 0), ([3, 5], 0), ([2, 3, 4], 1)]
    cases += [([rng.randint(2, 5) for _ in range(rng.randint(1, 4))], -1) for _ in range(4)]
    for shape, dim in cases:
        s = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
        got = expect_tensor(call(fn, s.clone(), dim=dim), f"softmax(scores of shape {tuple(shape)}, dim={dim})",
                            shape=shape)
        want = softmax(s, dim=dim)
        if not close(got, want, RTOL):
            for other in range(len(shape)):
                if other % len(shape) != dim % len(shape) and close(got, softmax(s, dim=other), RTOL):
                    raise Hint(f"you normalised along dim {other}; softmax(scores, dim={dim}) must sum to 1 along "
                               f"dim {dim}")
            raise Hint(f"softmax of scores with shape {tuple(shape)} along dim={dim} differs from "
                       f"exp(s) / exp(s).sum(dim) by up to {(got - want).abs().max().item():.2e}")
    big = torch.tensor([[750.0, 751.0, 749.0], [-750.0, -751.0, -752.0]], dtype=torch.float64)
    got = call(fn, big.clone(), dim=-1)
    if not torch.isfinite(got).all():
        raise Hint("softmax([750, 751, 749]) returned inf/nan: exp(750) overflows float64. Subtract the row "
                   "maximum first: exp(s - m) / sum exp(s - m) is the same value and never overflows")
    if not close(got, softmax(big), RTOL):
        raise Hint(f"softmax of large scores gave {got.tolist()}, expected {softmax(big).tolist()}")
    masked = torch.tensor([[0.5, float("-inf"), 1.0, float("-inf")]], dtype=torch.float64)
    src = masked.clone()
    got = call(fn, src, dim=-1)
    if not close(got, softmax(masked), RTOL):
        raise Hint(f"a row with masked (-inf) scores gave {got.tolist()}: masked keys should get weight 0, "
                   f"the others share the probability ({softmax(masked).tolist()})")
    if not torch.equal(src.isinf(), masked.isinf()) or not torch.equal(src[src.isfinite()], masked[masked.isfinite()]):
        raise Hint("your softmax changed its input in place: compute into a new tensor")
    return f"{len(cases) + 2} inputs, including scores near 750 and masked keys"


def _self_attention(q, k, v, causal=False):
    return self_attention(q, k, v, causal=causal)[0]


def _variants(q, k, v, causal):
    """Typical mistakes, each as the output it produces (float64)."""
    d = q.size(-1)
    T, S = q.size(-2), k.size(-2)
    future = ~causal_mask(T, S) if causal else torch.zeros(T, S, dtype=torch.bool)
    def attend(scores, dim=-1):
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=dim).nan_to_num() @ v
    qk = q @ k.transpose(-2, -1)
    out = {
        "you did not divide the scores by sqrt(d_k) (the head size)": attend(qk),
        "you divided the scores by d_k; the paper divides by sqrt(d_k)": attend(qk / d),
        "your softmax runs over the queries (dim -2); each query's weights over the keys (dim -1) must sum to 1":
            attend(qk / math.sqrt(d), dim=-2),
    }
    if causal:
        out["with causal=True every query must ignore later keys: mask scores with j > i to -inf before the "
            "softmax"] = torch.softmax(qk / math.sqrt(d), -1) @ v
        out["your causal mask is flipped: it hides the past and keeps the future"] = (
            torch.softmax((qk / math.sqrt(d)).masked_fill(causal_mask(T, S).tril(-1), float("-inf")), -1) @ v)
    return out


@exercise("01", "self_attention", solution=_self_attention)
def check_self_attention(fn, rng, gen):
    """self_attention(q, k, v, causal=False) -> softmax(q k^T / sqrt(d_k) [+ causal mask]) v, with
    q (B, nh, T, hs), k and v (B, nh, S, hs); returns the output (B, nh, T, hs)."""
    cases = 8
    for c in range(cases):
        causal = c % 2 == 1
        B, H, T, hs = rng.randint(1, 2), rng.randint(1, 3), rng.randint(2, 7), rng.choice([2, 4, 8])
        S = T if causal else rng.randint(2, 7)
        q, k, v = (torch.randn(B, H, n, hs, generator=gen, dtype=torch.float64) for n in (T, S, S))
        got = call(fn, q.clone(), k.clone(), v.clone(), causal=causal)
        if isinstance(got, tuple):  # (output, weights) is fine too
            got = got[0]
        expect_tensor(got, f"self_attention(q {tuple(q.shape)}, k {tuple(k.shape)}, v, causal={causal})",
                      shape=(B, H, T, hs))
        want = _self_attention(q, k, v, causal)
        if close(got, want, RTOL, atol=1e-12):
            continue
        hint = match_mistake(got, _variants(q, k, v, causal), rtol=RTOL, atol=1e-12)
        if hint:
            raise Hint(hint)
        b, h, t = (int(i) for i in ((got - want).abs().amax(-1) > 1e-9).nonzero()[0])
        raise Hint(f"output differs from softmax(q k^T / sqrt({hs})) v at batch {b}, head {h}, query {t} "
                   f"(causal={causal}, T={T}, S={S})")
    return f"{cases} random shapes, causal and not"
