"""Lesson 03 (sparse attention): a sliding-window block layout, a BigBird layout, the strided pattern.

References: `course.sparse.patterns.sliding_window(...).layout`, `bigbird(...).layout` (Zaheer et al.
2020, ITC: window + global + random blocks) and `strided(...).dense_mask()` (Child et al. 2019, section
4.2: A1(i) = {j : max(0, i - l) <= j <= i}, A2(i) = {j : (i - j) mod l = 0, j <= i}).
"""
from __future__ import annotations

import math

import torch

from course.sparse.patterns import bigbird, sliding_window, strided

from .core import call, exercise, expect_tensor, first_mask_difference


def _sliding_window_layout(seq_len, window, block_size, causal=False):
    return sliding_window(seq_len, window, block_size, causal).layout[0]


@exercise("03", "sliding_window_layout", solution=_sliding_window_layout)
def check_sliding_window_layout(fn, rng, gen):
    """sliding_window_layout(seq_len, window, block_size, causal=False) -> (nb, nb) bool with
    nb = ceil(seq_len / block_size): block (I, J) is kept iff some query i of block I may attend some
    key j of block J, i.e. |i - j| <= window (causal: 0 <= i - j <= window)."""
    cases = [(64, 8, 16, False), (64, 8, 16, True), (60, 16, 16, False)]
    cases += [(rng.randint(20, 120), rng.randint(1, 19), rng.choice([4, 8, 16]), rng.random() < 0.5) for _ in range(5)]
    for T, w, bs, causal in cases:
        nb = math.ceil(T / bs)
        what = f"sliding_window_layout({T}, window={w}, block_size={bs}, causal={causal})"
        got = expect_tensor(call(fn, T, w, bs, causal=causal), what, shape=(nb, nb), dtype=torch.bool)
        pattern = sliding_window(T, w, bs, causal)
        elems = pattern.dense_mask()[0]  # (T, T)

        def block(I, J):
            return elems[I * bs:(I + 1) * bs, J * bs:(J + 1) * bs]

        def extra(I, J):
            d = torch.arange(I * bs, min((I + 1) * bs, T))[:, None] - torch.arange(J * bs, min((J + 1) * bs, T))
            ok = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)  # (bs, bs) pairs causality allows
            why = ("all its keys come after its queries (causal)" if not ok.any() else
                   f"its closest query/key pair is {int(d[ok].abs().min())} tokens apart, more than window={w}")
            return f"{what}: block ({I}, {J}) is kept in yours but no pair in it is allowed: {why}"

        def missing(I, J):
            i, j = (int(v) for v in block(I, J).nonzero()[0])
            return (f"{what}: block ({I}, {J}) is missing, but query {I * bs + i} may attend key {J * bs + j} "
                    f"({abs(I * bs + i - J * bs - j)} <= window={w} tokens apart)")
        first_mask_difference(got, pattern.layout[0], extra, missing)
    return f"{len(cases)} layouts, causal and not, with a partial last block"


def _global_ids(nb: int, n_global: int) -> list[int]:
    """Where BigBird puts its global blocks (non-causal): the first ones and the last ones."""
    return list(range(n_global - n_global // 2)) + list(range(nb - n_global // 2, nb))


def _bigbird_layout(n_blocks, window_blocks, global_blocks, random_blocks):
    """Reference solution (also a spelled-out definition of the layout)."""
    idx = torch.arange(n_blocks)
    layout = (idx[:, None] - idx[None, :]).abs() <= window_blocks // 2  # the window, (nb, nb)
    layout[global_blocks, :] = True  # global blocks attend everything ...
    layout[:, global_blocks] = True  # ... and everything attends them
    for I, cols in enumerate(random_blocks):
        layout[I, list(cols)] = True
    return layout


@exercise("03", "bigbird_layout", solution=_bigbird_layout)
def check_bigbird_layout(fn, rng, gen):
    """bigbird_layout(n_blocks, window_blocks, global_blocks, random_blocks) -> (nb, nb) bool: the
    window (|I - J| <= window_blocks // 2), global rows and columns (block ids in `global_blocks`), and
    for each query block I the key blocks random_blocks[I]."""
    cases = [(8, 3, 2, 2)] + [(rng.randint(6, 14), rng.choice([1, 3, 5]), rng.randint(0, 3), rng.randint(0, 2))
                              for _ in range(5)]
    for nb, wb, ng, nr in cases:
        nr = min(nr, max(0, nb - wb - ng))
        ref = bigbird(nb * 8, 8, wb, ng, nr, seed=rng.randrange(1000)).layout[0]  # (nb, nb)
        glob = _global_ids(nb, ng)
        idx = torch.arange(nb)
        window = (idx[:, None] - idx[None, :]).abs() <= wb // 2
        is_glob = torch.zeros(nb, dtype=torch.bool)
        is_glob[glob] = True
        structured = window | is_glob[:, None] | is_glob[None, :]
        rand = [(ref[I] & ~structured[I]).nonzero().flatten().tolist() for I in range(nb)]
        what = f"bigbird_layout({nb}, window_blocks={wb}, global_blocks={glob}, random_blocks=...)"
        got = expect_tensor(call(fn, nb, wb, list(glob), [list(r) for r in rand]), what, shape=(nb, nb),
                            dtype=torch.bool)

        def extra(I, J):
            return (f"{what}: block ({I}, {J}) is kept, but {J} is not within {wb // 2} of {I} (window), neither "
                    f"is global, and {J} is not among random_blocks[{I}] = {rand[I]}")

        def missing(I, J):
            if is_glob[I]:
                why = f"{I} is a global block: it attends every block"
            elif is_glob[J]:
                why = f"{J} is a global block: every block attends it"
            elif window[I, J]:
                why = f"{J} is inside {I}'s window of {wb} blocks (|I - J| <= {wb // 2})"
            else:
                why = f"{J} is one of random_blocks[{I}] = {rand[I]}"
            return f"{what}: block ({I}, {J}) is missing: {why}"
        first_mask_difference(got, ref, extra, missing)
    return f"{len(cases)} layouts checked against course.sparse.patterns.bigbird"


def _strided_mask(T, stride):
    return strided(T, stride, block_size=min(T, 8)).dense_mask()[0]


@exercise("03", "strided_mask", solution=_strided_mask)
def check_strided_mask(fn, rng, gen):
    """strided_mask(T, stride) -> (T, T) bool: the Sparse Transformer's strided pattern with both parts
    in one head, query i sees key j iff j <= i and (i - j <= stride or (i - j) % stride == 0)."""
    cases = [(16, 4), (9, 8), (12, 1)] + [(rng.randint(6, 40), rng.randint(2, 6)) for _ in range(5)]
    for T, l in cases:
        what = f"strided_mask({T}, stride={l})"
        got = expect_tensor(call(fn, T, l), what, shape=(T, T), dtype=torch.bool)

        def extra(i, j):
            if j > i:
                return f"{what} lets token {i} see token {j}: the pattern is causal (j <= i)"
            return (f"{what} lets token {i} see token {j}: {i - j} tokens back is neither within the stride "
                    f"(<= {l}) nor a multiple of it")

        def missing(i, j):
            d = i - j
            why = (f"it is {d} tokens back, within the local part A1 (i - j <= stride, {l} included)" if d <= l
                   else f"{d} tokens back is a multiple of the stride (part A2)")
            return f"{what} hides token {j} from token {i}: {why}"
        first_mask_difference(got, _strided_mask(T, l), extra, missing)
    return f"{len(cases)} (T, stride) pairs"
