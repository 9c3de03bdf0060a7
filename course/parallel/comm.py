"""Instrumented collectives: every call counted (calls, bytes) and timed onto a per-rank timeline.

Bytes are what ONE rank sends on the wire with the ring algorithms NCCL and gloo use for large
messages (Patarasuk & Yuan 2009), for a tensor of n bytes on N ranks:

    reduce-scatter        (N-1)/N · n      each rank ends with the sum of its 1/N slice
    all-gather            (N-1)/N · n      (n = the gathered, full size)
    all-reduce          2·(N-1)/N · n      = reduce-scatter + all-gather
    broadcast                      n      (pipelined chain: every rank but the last forwards n)

So data parallelism moves 2(N-1)/N·Ψ elements per step and ZeRO-3 3(N-1)/N·Ψ = 1.5x (Rajbhandari et
al. 2020, section 7): the count does not shrink with N, which is why the interconnect matters.
The counts are per call from these formulas; the timeline is measured (time.perf_counter: on Linux
one monotonic clock for all processes, so ranks' spans line up; an async collective ends when its
future completes on the backend's thread).
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

# torch 2.13 renamed the tensor collectives; older releases only have the *_tensor spellings
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def ring_bytes(op: str, nbytes: float, world: int) -> float:
    """Bytes one rank sends for collective `op` on a tensor of `nbytes` (full size) over `world` ranks."""
    if world <= 1:
        return 0.0
    factor = {"all_reduce": 2 * (world - 1) / world, "reduce_scatter": (world - 1) / world,
              "all_gather": (world - 1) / world, "broadcast": 1.0}
    if op not in factor:
        raise ValueError(f"op must be one of {sorted(factor)}, got {op!r}")
    return factor[op] * nbytes


class Comm:
    """Collectives on the default process group that keep score. One per rank."""

    def __init__(self):
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.reset()

    def reset(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.spans: list[tuple[str, str, float, float]] = []  # (kind, name, start s, end s)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    def now(self) -> float:
        return time.perf_counter()

    @contextmanager
    def span(self, kind: str, name: str = ""):
        """Record a compute (or any) span on the timeline."""
        start = self.now()
        try:
            yield
        finally:
            self.spans.append((kind, name, start, self.now()))

    def _launch(self, op: str, nbytes: int, name: str, async_op: bool, call, alone=None):
        self.calls[op] += 1
        self.bytes[op] += ring_bytes(op, nbytes, self.world)
        if self.world == 1:  # nothing to talk to: the one-rank result, computed locally
            if alone is not None:
                alone()
            return _Done() if async_op else None
        start = self.now()
        work = call()
        if async_op:
            work.get_future().then(lambda fut: self.spans.append(("comm", name or op, start, self.now())))
            return work
        self.spans.append(("comm", name or op, start, self.now()))
        return None

    def all_reduce(self, t: torch.Tensor, async_op: bool = False, name: str = ""):
        """Sum t over ranks, in place."""
        return self._launch("all_reduce", t.numel() * t.element_size(), name, async_op,
                            lambda: dist.all_reduce(t, async_op=async_op))

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, async_op: bool = False, name: str = ""):
        """out (n/N) = this rank's slice of the sum over ranks of full (n)."""
        return self._launch("reduce_scatter", full.numel() * full.element_size(), name, async_op,
                            lambda: _reduce_scatter(out, full, async_op=async_op), lambda: out.copy_(full))

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor, async_op: bool = False, name: str = ""):
        """full (n) = concatenation of every rank's shard (n/N)."""
        return self._launch("all_gather", full.numel() * full.element_size(), name, async_op,
                            lambda: _all_gather(full, shard, async_op=async_op), lambda: full.copy_(shard))

    def broadcast(self, t: torch.Tensor, src: int = 0, name: str = ""):
        return self._launch("broadcast", t.numel() * t.element_size(), name, False,
                            lambda: dist.broadcast(t, src))

    def summary(self) -> dict:
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "total_bytes": self.total_bytes}


class _Done:
    def wait(self):
        return True
