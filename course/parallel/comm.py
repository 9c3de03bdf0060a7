"""Instrumented collectives: every call counted (calls, bytes) and timed onto a per-rank timeline.

`Comm(group)` wraps one process group (the whole world by default, or one dimension of a rank
mesh: `course.parallel.mesh.Mesh.comm("tensor")`), so a 3D-parallel run keeps one score per
dimension. Bytes are what ONE rank sends on the wire, from `course.costs.ring_bytes` (the ring
algorithms NCCL and gloo use for large messages, Patarasuk & Yuan 2009), for a tensor of n bytes
on the group's N ranks:

    reduce-scatter        (N-1)/N · n      each rank ends with the sum of its 1/N slice
    all-gather            (N-1)/N · n      (n = the gathered, full size)
    all-reduce          2·(N-1)/N · n      = reduce-scatter + all-gather
    all-to-all            (N-1)/N · n      every rank keeps 1/N of its own tensor
    broadcast                      n      (pipelined chain: every rank but the last forwards n)
    send                           n      point to point (pipeline stages); recv sends nothing

So data parallelism moves 2(N-1)/N·Ψ elements per step and ZeRO-3 3(N-1)/N·Ψ = 1.5x (Rajbhandari et
al. 2020, section 7): the count does not shrink with N, which is why the interconnect matters.
The counts are per call from these formulas; the timeline is measured (time.perf_counter: on Linux
one monotonic clock for all processes, so ranks' spans line up; an async collective ends when its
future completes on the backend's thread). Ranks given to `broadcast`, `send` and `recv` are ranks
*within the group* (0..N-1), translated to global ranks here.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

import torch
import torch.distributed as dist

from ..costs import ring_bytes

# torch 2.13 renamed the tensor collectives; older releases only have the *_tensor spellings
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Comm:
    """Collectives on one process group (default: the world) that keep score. One per rank and group."""

    def __init__(self, group=None, name: str = "world"):
        self.group, self.name = group, name
        self.rank = dist.get_rank(group) if dist.is_initialized() else 0
        self.world = dist.get_world_size(group) if dist.is_initialized() else 1
        self.reset()

    def __deepcopy__(self, memo):
        """A handle on a process group, not state: a copied module (a pipeline stage cut from a
        tensor-parallel model) keeps talking on the same group and keeps the same score."""
        return self

    def reset(self):
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self.spans: list[tuple[str, str, float, float]] = []  # (kind, name, start s, end s)

    @property
    def total_bytes(self) -> float:
        return float(sum(self.bytes.values()))

    def global_rank(self, group_rank: int) -> int:
        """The world rank of rank `group_rank` of this group."""
        if not 0 <= group_rank < self.world:
            raise ValueError(f"rank {group_rank} is outside group {self.name!r} of {self.world} ranks")
        if self.group is None or not dist.is_initialized():
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

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

    def _launch(self, op: str, nbytes: float, name: str, async_op: bool, call, alone=None):
        self.calls[op] += 1
        self.bytes[op] += nbytes if op == "send" else 0.0 if op == "recv" else ring_bytes(op, nbytes, self.world)
        if self.world == 1:  # nothing to talk to: the one-rank result, computed locally
            if alone is not None:
                alone()
            return _Done() if async_op else None
        start = self.now()
        work = call()
        if async_op:
            if op == "send":  # gloo's point-to-point work has no future: the span is the posting
                self.spans.append(("comm", name or op, start, self.now()))
            else:
                work.get_future().then(lambda fut: self.spans.append(("comm", name or op, start, self.now())))
            return work
        self.spans.append(("comm", name or op, start, self.now()))
        return None

    def all_reduce(self, t: torch.Tensor, async_op: bool = False, name: str = ""):
        """Sum t over the group's ranks, in place."""
        return self._launch("all_reduce", _nbytes(t), name, async_op,
                            lambda: dist.all_reduce(t, group=self.group, async_op=async_op))

    def reduce_scatter(self, out: torch.Tensor, full: torch.Tensor, async_op: bool = False, name: str = ""):
        """out (n/N along dim 0) = this rank's slice of the sum over ranks of full (n)."""
        return self._launch("reduce_scatter", _nbytes(full), name, async_op,
                            lambda: _reduce_scatter(out, full, group=self.group, async_op=async_op),
                            lambda: out.copy_(full))

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor, async_op: bool = False, name: str = ""):
        """full (n along dim 0) = concatenation of every rank's shard (n/N)."""
        return self._launch("all_gather", _nbytes(full), name, async_op,
                            lambda: _all_gather(full, shard, group=self.group, async_op=async_op),
                            lambda: full.copy_(shard))

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False, name: str = ""):
        """Rank r sends slice j (dim 0, n/N) of inp to rank j; out's slice j comes from rank j."""
        return self._launch("all_to_all", _nbytes(inp), name, async_op,
                            lambda: dist.all_to_all_single(out, inp, group=self.group, async_op=async_op),
                            lambda: out.copy_(inp))

    def broadcast(self, t: torch.Tensor, src: int = 0, name: str = ""):
        """t on every rank = t of group rank `src`."""
        return self._launch("broadcast", _nbytes(t), name, False,
                            lambda: dist.broadcast(t, self.global_rank(src), group=self.group))

    def send(self, t: torch.Tensor, dst: int, name: str = "", tag: int = 0, async_op: bool = False):
        """Point to point: t to group rank `dst`. Blocking (until the receiver has it, on gloo) or, with
        async_op, posted (returns a work handle; the rank carries on). `tag` pairs it with its recv."""
        dst = self.global_rank(dst)
        call = (lambda: dist.isend(t, dst, group=self.group, tag=tag)) if async_op else \
            (lambda: dist.send(t, dst, group=self.group, tag=tag))
        return self._launch("send", _nbytes(t), name, async_op, call)

    def recv(self, t: torch.Tensor, src: int, name: str = "", tag: int = 0):
        """Point to point: fill t from group rank `src` (the send with the same tag)."""
        return self._launch("recv", _nbytes(t), name, False,
                            lambda: dist.recv(t, self.global_rank(src), group=self.group, tag=tag))

    def summary(self) -> dict:
        return {"group": self.name, "world": self.world, "calls": dict(self.calls), "bytes": dict(self.bytes),
                "total_bytes": self.total_bytes}

    def __repr__(self) -> str:
        return (f"Comm({self.name!r}: rank {self.rank} of {self.world}, {sum(self.calls.values())} calls, "
                f"{self.total_bytes / 2**20:.2f} MiB sent)")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Done:
    def wait(self):
        return True
