"""Lesson 05 (data parallelism): gradient buckets, a bucketed all-reduce from gradient hooks, ZeRO's bytes.

References: the buckets `course.parallel.data_parallel.DataParallel` builds (Li et al. 2020, "PyTorch
Distributed", section 3.2: reverse order, a bucket closes once it holds >= the cap), and
`course.costs.model_state_bytes` (Rajbhandari et al. 2020, section 3 and figure 1).

The all-reduce exercise runs on one process: `FakeComm` stands in for `course.parallel.comm.Comm`
with `world` ranks whose gradients are 1, 2, ..., world times this rank's. Its all-reduce (a sum)
multiplies a tensor by world(world+1)/2, so the correct average is (world+1)/2 times the local
gradient, and forgetting the all-reduce, the division or the wait() each gives a recognisable value.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from course.costs import model_state_bytes
from course.parallel.comm import Comm
from course.parallel.data_parallel import DataParallel

from .core import Hint, call, close, exercise

MB = 2**20


def _dp_buckets(model: nn.Module, cap_bytes: int) -> list[list[nn.Parameter]]:
    """The reference: what DataParallel (one rank, Comm() of world size 1) builds for this cap."""
    return [b.params for b in DataParallel(model, Comm(), bucket_mb=cap_bytes / MB).buckets]


def _make_buckets(params, cap_bytes):
    """Reference solution: walk the parameters backwards, close a bucket once it holds >= cap bytes."""
    buckets, current, size = [], [], 0
    for p in reversed(list(params)):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= cap_bytes:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


def _variant(params, cap, reverse=True, strict=False, elements=False):
    """A typical mistake: forward order, '>' instead of '>=', or sizes counted in elements."""
    buckets, current, size = [], [], 0
    for p in (reversed(params) if reverse else params):
        current.append(p)
        size += p.numel() * (1 if elements else p.element_size())
        if size > cap if strict else size >= cap:
            buckets.append(current)
            current, size = [], 0
    return buckets + ([current] if current else [])


def _mlp(widths, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


@exercise("05", "make_buckets", solution=_make_buckets)
def check_make_buckets(fn, rng, gen):
    """make_buckets(params, cap_bytes) -> list of buckets (lists of parameters): parameters in reverse
    order (the order backward produces their gradients); a bucket closes as soon as it holds >= cap_bytes."""
    n_cases = 6
    for c in range(n_cases):
        model = _mlp([rng.randint(2, 24) for _ in range(rng.randint(3, 5))], seed=c)
        params = list(model.parameters())
        names = {id(p): n for n, p in model.named_parameters()}
        sizes = [p.numel() * p.element_size() for p in params]
        cap = [sizes[-1] + sizes[-2], min(sizes) // 2 + 1, sum(sizes) * 2][c] if c < 3 else rng.randint(
            min(sizes), sum(sizes))  # exactly two parameters / one each / one bucket / random
        want = _dp_buckets(model, cap)
        got = call(fn, list(params), cap, describe=f"make_buckets(params, cap_bytes={cap})")
        try:
            got = [list(b) for b in got]
            show = lambda bs: [[names[id(p)] for p in b] for b in bs]
            got_names = show(got)
        except (TypeError, KeyError):
            raise Hint("make_buckets should return a list of lists of the parameters it was given") from None
        if got_names == show(want):
            continue
        mistakes = {"backward produces gradients last layer first: walk the parameters in reverse "
                    "(reversed(params)), so bucket 0 starts with the last parameter": _variant(params, cap, reverse=False),
                    "close a bucket as soon as its size reaches the cap (size >= cap_bytes), not only when it "
                    "exceeds it": _variant(params, cap, strict=True),
                    "the cap is in bytes: count p.numel() * p.element_size(), not p.numel()":
                        _variant(params, cap, elements=True)}
        for hint, wrong in mistakes.items():
            if got_names == show(wrong) != show(want):
                raise Hint(f"cap {cap} bytes: you built {got_names}; {hint}")
        raise Hint(f"cap {cap} bytes, parameter bytes {dict(zip(names.values(), sizes))}: you built {got_names}, "
                   f"DataParallel builds {show(want)}")
    return f"{n_cases} models and caps, against DataParallel's buckets"


class FakeComm:
    """One process pretending to be rank 0 of `world` ranks (see the module docstring)."""

    def __init__(self, world: int = 4):
        self.world, self.rank = world, 0
        self.calls: list[tuple[int, bool]] = []  # (numel, launched during backward)
        self.in_backward = False

    def all_reduce(self, t: torch.Tensor, async_op: bool = False, name: str = ""):
        self.calls.append((t.numel(), self.in_backward))
        factor = self.world * (self.world + 1) / 2  # sum over ranks of (r + 1) * t
        if not async_op:
            t.mul_(factor)
            return None
        return _FakeWork(lambda: t.mul_(factor))


class _FakeWork:
    def __init__(self, complete):
        self._complete, self.done = complete, False

    def wait(self):
        if not self.done:
            self._complete()
            self.done = True
        return True


def _install_bucketed_all_reduce(buckets, comm):
    """Reference solution: hooks launch each full bucket's all-reduce; finish() waits and averages."""
    where = {id(p): b for b, bucket in enumerate(buckets) for p in bucket}
    ready, pending = [0] * len(buckets), []

    def hook(p):
        b = where[id(p)]
        ready[b] += 1
        if ready[b] == len(buckets[b]):  # the bucket's last gradient: ship it now, backward goes on
            flat = torch.cat([q.grad.flatten() for q in buckets[b]])
            pending.append((b, flat, comm.all_reduce(flat, async_op=True)))

    for bucket in buckets:
        for p in bucket:
            p.register_post_accumulate_grad_hook(hook)

    def finish():
        for b, flat, work in pending:
            work.wait()
            flat /= comm.world
            for p, g in zip(buckets[b], flat.split([q.numel() for q in buckets[b]])):
                p.grad.copy_(g.view_as(p))
        pending.clear()
        ready[:] = [0] * len(buckets)
    return finish


@exercise("05", "bucketed_all_reduce", solution=_install_bucketed_all_reduce)
def check_bucketed_all_reduce(fn, rng, gen):
    """install_bucketed_all_reduce(buckets, comm) -> finish: register a hook on every parameter
    (p.register_post_accumulate_grad_hook); when a bucket's last gradient arrives, flatten the bucket's
    gradients into one tensor and start comm.all_reduce(flat, async_op=True). finish(), called after
    backward, waits for every bucket, divides by comm.world and writes the averages back into p.grad."""
    n_cases = 3
    for c in range(n_cases):
        widths = [rng.randint(3, 10) for _ in range(4)]
        model, ref = _mlp(widths, seed=c, dtype=torch.float64), _mlp(widths, seed=c, dtype=torch.float64)
        x = torch.randn(5, widths[0], generator=gen, dtype=torch.float64)
        ref(x).square().sum().backward()
        sizes = [p.numel() * p.element_size() for p in model.parameters()]
        buckets = _make_buckets(list(model.parameters()), sizes[-1] + sizes[-2])
        comm = FakeComm(world=4)
        finish = call(fn, buckets, comm, describe="install_bucketed_all_reduce(buckets, comm)")
        if not callable(finish):
            raise Hint("install_bucketed_all_reduce should return finish, a function to call after backward")
        for step in range(2):
            model.zero_grad(set_to_none=True)
            comm.calls.clear()
            comm.in_backward = True
            try:
                call(lambda: model(x).square().sum().backward(), describe="backward, running your hooks")
            finally:
                comm.in_backward = False
            call(finish, describe="finish()")
            again = " (on the second step: reset your per-step state, e.g. ready counts and pending work, in " \
                    "finish())" if step else ""
            numels = [n for n, _ in comm.calls]
            want = [sum(p.numel() for p in b) for b in buckets]
            if len(numels) != len(buckets):
                raise Hint(f"{len(numels)} all-reduce calls for {len(buckets)} buckets{again}: one call per bucket, "
                           f"on the bucket's gradients flattened into one tensor")
            if numels != want:
                raise Hint(f"your all-reduces held {numels} elements, the buckets {want} (in order){again}: "
                           f"flatten all of a bucket's gradients (torch.cat of p.grad.flatten())")
            if not any(during for _, during in comm.calls):
                raise Hint("every all-reduce started after backward had finished: start a bucket's all-reduce "
                           "inside the hook, as soon as its last gradient has arrived, so it overlaps the rest "
                           "of backward")
            grads = [p.grad for p in model.parameters()]
            local = [p.grad for p in ref.parameters()]
            if any(g is None for g in grads):
                raise Hint("a parameter has no gradient after finish(): write the averaged bucket back into p.grad")
            mean, total = (comm.world + 1) / 2, comm.world * (comm.world + 1) / 2
            # float64; each gradient is multiplied, then divided once: rounding stays far below 1e-12
            check = lambda k: all(close(g, k * r, 1e-12, 1e-12) for g, r in zip(grads, local))
            if check(mean):
                continue
            if check(total):
                raise Hint(f"p.grad holds the SUM over the {comm.world} ranks: divide by comm.world to average{again}")
            if check(1.0):
                raise Hint(f"p.grad is still this rank's own gradient{again}: write the all-reduced bucket back "
                           f"into p.grad, after work.wait() (an async all-reduce has finished only then)")
            if check(1 / comm.world):
                raise Hint(f"p.grad is this rank's gradient divided by {comm.world}: the all-reduce had not finished "
                           f"when you read the buffer{again}. Call work.wait() on what all_reduce(..., async_op=True) "
                           f"returned before using the result")
            raise Hint(f"p.grad is not the average over the ranks{again}")
    return f"{n_cases} models x 2 steps: one all-reduce per bucket, during backward, averaged"


PER_PARAM = {"mixed": (2, 2, 12), "fp32": (4, 4, 8)}


def _zero_bytes_per_rank(n_params, stage, world):
    return model_state_bytes(n_params, "mixed", stage, world)["total"]


@exercise("05", "zero_bytes", solution=_zero_bytes_per_rank)
def check_zero_bytes(fn, rng, gen):
    """zero_bytes_per_rank(n_params, stage, world) -> bytes of parameters + gradients + optimizer state
    per rank under mixed-precision Adam (2 + 2 + K = 12 bytes per parameter); ZeRO stage 1 shards the
    optimizer state over `world` ranks, stage 2 also the gradients, stage 3 also the parameters."""
    cases = [(7.5e9, s, 64) for s in range(4)] + [(rng.randint(10**6, 10**10), rng.randint(0, 3), rng.choice(
        [2, 4, 8, 16, 1024])) for _ in range(8)]
    parts = ("parameters", "gradients", "optimizer state")
    for n, stage, N in cases:
        got = call(fn, n, stage, N)
        want = _zero_bytes_per_rank(n, stage, N)
        if isinstance(got, (int, float)) and close(got, want, 1e-9):  # float arithmetic, any order
            continue
        right = {parts[i] for i in range(3) if stage >= 3 - i}
        for (kind, per), shard in itertools.product(PER_PARAM.items(), itertools.product((0, 1), repeat=3)):
            wrong = sum(b * n / (N if s else 1) for b, s in zip(per, shard))
            if isinstance(got, (int, float)) and close(got, wrong, 1e-9):
                yours = {p for p, s in zip(parts, shard) if s}
                if kind == "fp32":
                    raise Hint("you count 4 + 4 + 8 bytes per parameter (fp32 AdamW); ZeRO's mixed precision keeps "
                               "2 (fp16 weights) + 2 (fp16 gradients) + 12 (fp32 master weights, momentum, variance)")
                raise Hint(f"ZeRO-{stage} on {N} ranks: you shard {sorted(yours) or 'nothing'}, but stage {stage} "
                           f"shards {sorted(right) or 'nothing (plain data parallelism)'}")
        raise Hint(f"zero_bytes_per_rank({n:g}, {stage}, {N}) returned {got!r}, expected {want:g} bytes")
    return f"{len(cases)} cases, including the ZeRO paper's 7.5B parameters on 64 GPUs"
