"""Lesson 11 (flash attention): the online softmax, and attention one key block at a time.

Online softmax (Milakov & Gimelshein 2018): read x in chunks, keep the running maximum m and the running
sum l = sum exp(x - m); when a chunk raises the maximum to m', rescale l by exp(m - m'). FlashAttention
(Dao et al. 2022, algorithm 1) does the same per query row for the output: o is rescaled with l, so
attention never holds the (T, S) score matrix, only (T, block) tiles.

REFERENCE WRITTEN HERE: torch.logsumexp / the written-out softmax(q kᵀ / sqrt d) v in float64 (the
claims are equalities; the rescalings round far below the 1e-10 relative used). The "no (T, S) tensor"
check watches every tensor the learner's code creates with a TorchDispatchMode. When lesson 11's
library lands, point the references at it.
"""
from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .core import Hint, call, close, exercise, expect_tensor

RTOL = ATOL = 1e-10


def _online_softmax_stats(chunks):
    """Reference solution: one pass over an iterator of 1-D chunks -> (max, sum of exp(x - max))."""
    m, l = float("-inf"), 0.0
    for c in chunks:
        m_new = max(m, c.max().item())
        l = l * math.exp(m - m_new) + (c - m_new).exp().sum().item()
        m = m_new
    return m, l


@exercise("11", "online_softmax_stats", solution=_online_softmax_stats)
def check_online_softmax_stats(fn, rng, gen):
    """online_softmax_stats(chunks) -> (m, l): chunks is an iterator of 1-D tensors that can be read ONCE;
    m = the max of all values, l = sum of exp(x - m) over all values."""
    cases = [([-5.0, -3.0], 2), ([1.0, 4.0, 2.0, 9.0], 1)]
    cases += [(torch.randn(rng.randint(4, 40), generator=gen, dtype=torch.float64).mul(rng.choice([1, 10, 100]))
               .tolist(), rng.randint(1, 7)) for _ in range(5)]
    for values, size in cases:
        x = torch.tensor(values, dtype=torch.float64)
        chunks = iter(x.split(size))  # an iterator: the values can be read only once, in order
        got = call(fn, chunks, describe=f"online_softmax_stats(chunks of {size})")
        if not (isinstance(got, tuple) and len(got) == 2):
            raise Hint("online_softmax_stats should return a pair (m, l)")
        m, l = (float(v) for v in got)
        want_m = x.max().item()
        want_l = (x - want_m).exp().sum().item()
        if m != want_m:
            raise Hint(f"m = {m} but the largest value is {want_m}" + (
                ": start from m = -inf, not 0 (all these values are negative)" if want_m < 0 and m == 0 else ""))
        if close(l, want_l, RTOL, ATOL):
            continue
        no_rescale = sum((c - torch.cummax(x, 0).values[min(len(x) - 1, i * size + len(c) - 1)]).exp().sum().item()
                         for i, c in enumerate(x.split(size)))
        if close(l, no_rescale, RTOL, ATOL):
            raise Hint("when a chunk raises the maximum from m to m', the sum so far must be rescaled: "
                       "l = l·exp(m - m') + sum(exp(chunk - m'))")
        raise Hint(f"l = {l:.6g}, expected sum(exp(x - m)) = {want_l:.6g}")
    return f"{len(cases)} streams, read once"


class _Largest(TorchDispatchMode):
    """Records the largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _attention(q, k, v):
    return torch.softmax(q @ k.T / math.sqrt(q.size(-1)), -1) @ v


def _online_attention(q, k, v, block, rescale=True, divide=True):
    """Reference solution: keys and values in blocks; running max m, sum l and output o per query.
    (rescale=False / divide=False build two typical mistakes, for hints.)"""
    T, d = q.shape
    m = torch.full((T, 1), float("-inf"), dtype=q.dtype)
    l = torch.zeros(T, 1, dtype=q.dtype)
    o = torch.zeros(T, v.size(-1), dtype=q.dtype)
    for start in range(0, k.size(0), block):
        s = q @ k[start:start + block].T / math.sqrt(d)  # (T, block): one tile of scores
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        p = (s - m_new).exp()
        scale = (m - m_new).exp() if rescale else torch.ones_like(m)  # how much the old maximum overstated
        l = l * scale + p.sum(-1, keepdim=True)
        o = o * scale + p @ v[start:start + block]
        m = m_new
    return o / l if divide else o


@exercise("11", "online_attention", solution=_online_attention)
def check_online_attention(fn, rng, gen):
    """online_attention(q, k, v, block) -> softmax(q kᵀ / sqrt(d)) v for q (T, d), k (S, d), v (S, dv),
    computed over blocks of `block` keys without ever creating a (T, S) tensor."""
    # T > d, so a (T, S) tensor is larger than any tile (T, block), q (T, d) or k, v (S, d)
    cases = [(8, 16, 4, 4), (6, 12, 3, 3)] + [(rng.randint(5, 10), 4 * b, rng.choice([2, 4]), b)
                                              for b in (rng.randint(2, 5) for _ in range(4))]
    for T, S, d, block in cases:
        q, k, v = (torch.randn(n, d, generator=gen, dtype=torch.float64) * 2 for n in (T, S, S))
        what = f"online_attention(q ({T}, {d}), k ({S}, {d}), v, block={block})"
        watch = _Largest()
        with watch:
            got = call(fn, q.clone(), k.clone(), v.clone(), block, describe=what)
        expect_tensor(got, what, shape=(T, d))
        want = _attention(q, k, v)
        if not close(got, want, RTOL, ATOL):
            if close(got, _online_attention(q, k, v, block, rescale=False), RTOL, ATOL):
                raise Hint(f"{what}: when a block raises a query's running max from m to m', rescale what you have "
                           f"summed so far: multiply l and o by exp(m - m')")
            if close(got, _online_attention(q, k, v, block, divide=False), RTOL, ATOL):
                raise Hint(f"{what}: o is still unnormalised: divide it by the running sum l at the end")
            raise Hint(f"{what} differs from softmax(q kᵀ / sqrt(d)) v by up to {(got - want).abs().max().item():.2e}:"
                       " keep per query the running max m, the running sum l and the unnormalised output o")
        if watch.largest >= T * S:
            raise Hint(f"{what} is right but created a tensor of {watch.largest} elements, as large as the whole "
                       f"({T}, {S}) score matrix: work on (T, block) tiles of scores")
    return f"{len(cases)} shapes, never holding a (T, S) tensor"
