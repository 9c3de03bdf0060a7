"""Lesson 04 (activation recomputation): sqrt(n) segments, the bytes a block keeps, a segment runner.

References: `course.recompute.segments_for("sqrt", n)` (Chen et al. 2016: ceil(sqrt n) blocks per
segment), `course.costs.layer_activation_bytes` (this block's saved bytes, checked against
`course.measure.saved_tensors` in tests/test_memory.py; Korthikanti et al. 2022, section 4.1) and
`course.recompute.SegmentRunner` (torch.utils.checkpoint with use_reentrant=False).
"""
from __future__ import annotations

import math

import torch

from course.costs import layer_activation_bytes
from course.model import ModelConfig, Transformer, run_blocks
from course.recompute import SegmentRunner, segments_for

from .core import Hint, call, close, exercise, expect_tensor


def _sqrt_segments(n):
    return [(a, b) for a, b, _ in segments_for("sqrt", n)]


@exercise("04", "sqrt_segments", solution=_sqrt_segments)
def check_sqrt_segments(fn, rng, gen):
    """sqrt_segments(n) -> [(start, stop), ...]: consecutive segments of m = ceil(sqrt(n)) blocks
    (the last one takes what is left) covering blocks 0..n-1; stop is exclusive."""
    sizes = [1, 4, 10, 16, 17] + [rng.randint(2, 100) for _ in range(5)]
    for n in sizes:
        got = call(fn, n)
        try:
            got = [(int(a), int(b)) for a, b in got]
        except (TypeError, ValueError):
            raise Hint(f"sqrt_segments({n}) should return a list of (start, stop) pairs, got {got!r}") from None
        covered = [0] * n
        for a, b in got:
            for i in range(max(a, 0), min(b, n)):
                covered[i] += 1
        if 0 in covered:
            raise Hint(f"sqrt_segments({n}): block {covered.index(0)} is in no segment (stop is exclusive: "
                       f"(0, 3) holds blocks 0, 1, 2)")
        if any(c > 1 for c in covered):
            i = next(i for i, c in enumerate(covered) if c > 1)
            raise Hint(f"sqrt_segments({n}): block {i} is in two segments; each block belongs to exactly one")
        want = _sqrt_segments(n)
        if got != want:
            m = math.ceil(math.sqrt(n))
            sizes_got = [b - a for a, b in got]
            raise Hint(f"sqrt_segments({n}) gave segments of {sizes_got} blocks; expected {[b - a for a, b in want]}:"
                       f" m = ceil(sqrt({n})) = {m} blocks per segment, in order, the last one takes the rest"
                       + (" (floor(sqrt n) gives more segments than the bound needs)" if m * m != n and
                          sizes_got and sizes_got[0] == math.isqrt(n) else ""))
    return f"n = {', '.join(map(str, sizes))}"


def _block_bytes(s, b, h, a):
    return sum(layer_activation_bytes(s, b, h, a).values())


# What each term of the formula is (bytes; fp32 = 4 bytes per element), for hints.
_TERMS = {
    "sbh": ("s·b·h", {4: "e.g. one LayerNorm input, the c_attn input, the attention output or the c_fc input "
                         "(1·sbh each)", 12: "e.g. q, k and v (3·sbh, views of the c_attn output)",
                      16: "e.g. the GELU input or the MLP c_proj input (4·sbh each)"}),
    "sb": ("s·b", {16: "the LayerNorm statistics: mean and 1/std, 2·sb values per LayerNorm, two LayerNorms",
                   8: "one LayerNorm's statistics (mean and 1/std, 2·sb values)"}),
    "asb": ("a·s·b", {4: "the attention log-sum-exp: a·s·b fp32 values the fused kernel keeps for backward"}),
    "as2b": ("a·s²·b", {}),
}


def _basis(s, b, h, a):
    return {"sbh": s * b * h, "sb": s * b, "asb": a * s * b, "as2b": a * s * s * b}


def _explain_difference(cases, got, want) -> str | None:
    """Write got - want as integer multiples of the formula's terms (solved on the random cases)."""
    A = torch.tensor([list(_basis(*c).values()) for c in cases], dtype=torch.float64)
    d = torch.tensor([g - w for g, w in zip(got, want)], dtype=torch.float64)
    coef = torch.linalg.lstsq(A, d[:, None]).solution.flatten().round()
    if not all(sum(int(k) * v for k, v in zip(coef.tolist(), _basis(*c).values())) == g - w
               for c, g, w in zip(cases, got, want)):
        return None
    parts = []
    for (name, (label, why)), k in zip(_TERMS.items(), coef.tolist()):
        k = int(k)
        if k == 0:
            continue
        if name == "as2b":
            parts.append(f"you count {k:+d}·{label} bytes: fused attention (SDPA) keeps no s×s matrix; it "
                         f"recomputes the scores from q, k, v in backward")
            continue
        where = why.get(abs(k), "")
        amount = f"{abs(k)}·{label} bytes" + (f" ({abs(k) // 4}·{label} fp32 elements)" if k % 4 == 0 else "")
        parts.append((f"you count {amount} too many" if k > 0 else f"you are missing {amount}")
                     + (f", {where}" if where else ""))
    return "; ".join(parts)


@exercise("04", "block_bytes", solution=_block_bytes)
def check_block_bytes(fn, rng, gen):
    """block_bytes(s, b, h, a) -> bytes one course.model.Block saves for backward: fp32, fused attention
    (SDPA), no dropout, on the CPU; s tokens, b sequences, width h, a heads."""
    cases = [(rng.choice([16, 64, 128, 256, 512]), rng.randint(1, 8), 0, rng.choice([1, 2, 4, 8]))
             for _ in range(10)]
    cases = [(s, b, a * rng.choice([8, 16, 32, 64]), a) for s, b, _, a in cases]
    got = [call(fn, *c) for c in cases]
    want = [_block_bytes(*c) for c in cases]
    for c, g in zip(cases, got):
        if not isinstance(g, (int, float)) or isinstance(g, bool):
            raise Hint(f"block_bytes{c} should return a number of bytes, got {type(g).__name__}")
    if got == want:
        return f"{len(cases)} random shapes"
    if all(4 * g == w for g, w in zip(got, want)):
        raise Hint("you count elements, not bytes: every fp32 element is 4 bytes")
    explained = _explain_difference(cases, got, want)
    i = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
    detail = f"block_bytes{cases[i]} = {got[i]:,}, expected {want[i]:,}"
    raise Hint(f"{detail}: {explained}" if explained else
               f"{detail}: expect 16·sbh fp32 elements plus the LayerNorm statistics and the attention log-sum-exp")


def _run_segments(blocks, x, segments):
    return SegmentRunner(segments)(blocks, x)


def _tiny_blocks(n_layer, seed):
    torch.manual_seed(seed)
    cfg = ModelConfig.gpt(n_layer=n_layer, n_head=2, n_embd=16, block_size=8, vocab_size=16)
    return Transformer(cfg).double().blocks


def _counting(blocks):
    counts = [0] * len(blocks)
    handles = [blk.register_forward_pre_hook(lambda m, args, i=i: counts.__setitem__(i, counts[i] + 1))
               for i, blk in enumerate(blocks)]
    return counts, handles


@exercise("04", "run_segments", solution=_run_segments)
def check_run_segments(fn, rng, gen):
    """run_segments(blocks, x, segments) -> output: run the blocks in order, segment by segment;
    segments are (start, stop, checkpointed) and a checkpointed segment runs under
    torch.utils.checkpoint.checkpoint(..., use_reentrant=False), so backward runs it again."""
    cases = [("full", 3, None), ("sqrt", 5, None), ("every-k", 4, 2), ("none", 2, None), ("sqrt", 9, None)]
    for policy, n, k in cases:
        segments = segments_for(policy, n, k)
        seed = rng.randrange(1000)
        x = torch.randn(2, 8, 16, generator=gen, dtype=torch.float64)
        ref_blocks = _tiny_blocks(n, seed)
        xr = x.clone().requires_grad_()
        run_blocks(ref_blocks, xr).square().sum().backward()
        blocks = _tiny_blocks(n, seed)
        counts, handles = _counting(blocks)
        xl = x.clone().requires_grad_()
        try:
            out = call(fn, blocks, xl, list(segments), describe=f"run_segments(blocks, x, {segments})")
            expect_tensor(out, "run_segments(...)", shape=x.shape)
            forward_counts = list(counts)
            if forward_counts != [1] * n:
                i = next(i for i, c in enumerate(forward_counts) if c != 1)
                raise Hint(f"during the forward pass block {i} ran {forward_counts[i]} times (segments {segments}): "
                           f"run every block once, in order")
            out.square().sum().backward()
        finally:
            for hnd in handles:
                hnd.remove()
        # the same float64 ops in the same order: outputs and gradients agree to rounding (1e-12)
        if not close(out, run_blocks(ref_blocks, x), 1e-12, 1e-12):
            raise Hint(f"the output differs from running the blocks in order (segments {segments}): feed each "
                       f"segment's output into the next segment")
        if xl.grad is None or not close(xl.grad, xr.grad, 1e-12, 1e-12):
            raise Hint("the gradient with respect to x differs from plain backward: checkpoint must wrap a "
                       "function of the segment's input, and return its output")
        for i, (a, b, ckpt) in enumerate(segments):
            for j in range(a, b):
                if ckpt and counts[j] != 2:
                    raise Hint(f"block {j} ran {counts[j]} time(s) in forward + backward: its segment ({a}, {b}) "
                               f"is checkpointed, so backward must recompute it (wrap the segment in "
                               f"checkpoint(run, x, use_reentrant=False))")
                if not ckpt and counts[j] != 1:
                    raise Hint(f"block {j} ran {counts[j]} times: its segment ({a}, {b}) is not checkpointed, "
                               f"so it should run once and keep its activations")
    return f"{len(cases)} policies (full, sqrt, every-k, none): outputs, gradients and recomputed blocks"
