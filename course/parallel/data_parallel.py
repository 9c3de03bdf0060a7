"""Data parallelism: N ranks, one model copy each, N slices of the batch, one averaged gradient.

Each rank computes the gradient of the mean loss over its B/N sequences; the average of the N
gradients is the gradient of the mean loss over all B sequences, so after the same optimizer step
every copy holds exactly what one process would hold after training on the full batch.
The average is an all-reduce: 2(N-1)/N·Ψ elements sent per rank per step (`course.costs.ring_bytes`).

`DataParallel(module)` honours the contract of torch.nn.parallel.DistributedDataParallel, so code
written for DDP works with it: wrap, call `loss.backward()` yourself, step any optimizer over
`model.parameters()`; gradients are averaged by the time backward returns; `no_sync()` skips the
communication for gradient accumulation (M micro-batches cost one all-reduce, not M).
- bucket_mb=None: naive. After backward, all-reduce each gradient in turn. Nothing overlaps.
- bucket_mb=x: DDP's design (Li et al. 2020, "PyTorch Distributed", section 3.2). Parameters are put
  in buckets of about x MB in reverse order (the order backward produces their gradients); a hook
  fires when a gradient is final, and a bucket's all-reduce starts the moment it is full, while
  backward keeps computing earlier layers (overlap). Buckets are launched strictly in index order,
  so every rank issues the same collectives in the same order.
The end of backward is found the way DDP finds it: the first gradient hook of a backward queues a
callback on the autograd engine, which runs once the whole backward has finished.

What every rank starts from: the whole state of rank 0 (trainable and frozen parameters and every
buffer) is broadcast at construction, as DDP does. Frozen parameters are never communicated again.
Parameters that get no gradient in a backward (registered but unused in forward): with
find_unused_parameters=False (DDP's default) that is an error naming them; with True they count as
zero on that rank, a small all-reduce of "used" flags follows, and a parameter unused on every rank
keeps grad None, exactly as one process would leave it (so the optimizer skips it, as torch DDP's
find_unused_parameters=True does).
Tied weights: model.parameters() yields each Parameter once, so the tied wte/lm_head weight is
all-reduced once; autograd sums both uses' gradients before its hook fires.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from .comm import Comm


def broadcast_state(module: nn.Module, comm: Comm) -> None:
    """Every rank gets group rank 0's parameters (trainable or frozen) and buffers."""
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            comm.broadcast(t.data, src=0, name=f"broadcast {name}")


def shard_batch(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rows [rank*B/N, (rank+1)*B/N) of a (B, ...) batch."""
    B = t.size(0)
    if world > B:
        raise ValueError(f"world size ({world}) is larger than the batch ({B} sequences): "
                         f"each rank needs at least one sequence")
    if B % world:
        raise ValueError(f"batch size ({B}) must be divisible by the world size ({world}) "
                         f"so every rank gets the same number of sequences")
    b = B // world
    return t[rank * b:(rank + 1) * b]


def queue_end_of_backward(callback) -> None:
    """Run `callback` once the current backward pass has finished (what DDP's reducer does)."""
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.buffer = torch.zeros(self.offsets[-1], dtype=params[0].dtype, device=params[0].device)  # (n,)
        self.ready: set[int] = set()
        self.work = None

    def slot(self, i: int) -> torch.Tensor:
        return self.buffer[self.offsets[i]:self.offsets[i + 1]]


class DataParallel(nn.Module):
    """DDP-style wrapper: same forward as `module`, gradients averaged over `comm`'s ranks."""

    def __init__(self, module: nn.Module, comm: Comm | None = None, bucket_mb: float | None = 25.0,
                 find_unused_parameters: bool = False):
        super().__init__()
        if bucket_mb is not None and (not isinstance(bucket_mb, (int, float)) or isinstance(bucket_mb, bool)
                                      or not 0 < bucket_mb < float("inf")):
            raise ValueError(f"bucket_mb must be a finite number > 0 (megabytes per bucket) or None (naive: "
                             f"one all-reduce per gradient after backward), got {bucket_mb!r}")
        self.module, self.comm = module, comm or Comm()
        self.bucket_mb, self.find_unused_parameters = bucket_mb, find_unused_parameters
        broadcast_state(module, self.comm)
        self.names = {p: n for n, p in module.named_parameters()}
        params = [p for p in module.parameters() if p.requires_grad]  # each tied Parameter once
        if not params:
            raise ValueError("DataParallel: the module has no trainable parameters")
        cap = (bucket_mb if bucket_mb is not None else 0) * 2**20  # naive: every parameter its own bucket
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for p in reversed(params):  # backward meets the last layers first
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= cap:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.where = {}  # id(param) -> (bucket index, slot index)
        for b, bucket in enumerate(self.buckets):
            for i, p in enumerate(bucket.params):
                self.where[id(p)] = (b, i)
                p.register_post_accumulate_grad_hook(self._grad_ready)
        self.sync, self._queued, self._next = True, False, 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally; the next backward outside this context averages them all."""
        before, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = before

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Runs inside backward once p.grad is final (both uses of a tied weight already summed)."""
        if not self.sync:
            return
        if not self._queued:
            self._queued = True
            queue_end_of_backward(self._finish)
        b, i = self.where[id(p)]
        bucket = self.buckets[b]
        bucket.slot(i).copy_(p.grad.view(-1))
        bucket.ready.add(i)
        if self.bucket_mb is not None:  # overlap: ship every full bucket, in index order
            self._launch_ready()

    def _launch_ready(self):
        while self._next < len(self.buckets) and len(self.buckets[self._next].ready) == len(self.buckets[self._next].params):
            bucket = self.buckets[self._next]
            bucket.work = self.comm.all_reduce(bucket.buffer, async_op=True, name=f"bucket {self._next}")
            self._next += 1

    def _finish(self) -> None:
        """After the whole backward: gradients that never came, the remaining buckets, the averages."""
        self._queued = False
        missing = [(b, i) for b, bucket in enumerate(self.buckets) for i in range(len(bucket.params))
                   if i not in bucket.ready]
        if missing and not self.find_unused_parameters:
            names = [self.names[self.buckets[b].params[i]] for b, i in missing]
            self._reset()
            raise RuntimeError(f"DataParallel: parameter(s) {names} received no gradient in this backward (unused in "
                               f"forward). Pass find_unused_parameters=True (as with torch DDP), or freeze them "
                               f"with requires_grad_(False).")
        for b, i in missing:  # unused here: this rank contributes zero
            self.buckets[b].slot(i).zero_()
            self.buckets[b].ready.add(i)
        if self.bucket_mb is None:  # naive: one all-reduce per gradient, now, one after the other
            for b, bucket in enumerate(self.buckets):
                self.comm.all_reduce(bucket.buffer, name=f"grad {b}")
            self._next = len(self.buckets)
        self._launch_ready()
        used = None
        if self.find_unused_parameters:  # which parameters got a gradient on some rank
            used = torch.tensor([float(p.grad is not None) for bucket in self.buckets for p in bucket.params])
            self.comm.all_reduce(used, name="used-parameter flags")
        k = 0
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.buffer.div_(self.comm.world)
            for i, p in enumerate(bucket.params):
                if used is not None and used[k] == 0:
                    p.grad = None  # unused on every rank: what one process would have
                elif p.grad is None:
                    p.grad = bucket.slot(i).view_as(p).clone()
                else:
                    p.grad.copy_(bucket.slot(i).view_as(p))
                k += 1
        self._reset()

    def _reset(self):
        for bucket in self.buckets:
            bucket.ready.clear()
            bucket.work = None
        self._next = 0

    def extra_repr(self) -> str:
        kind = "naive" if self.bucket_mb is None else f"{len(self.buckets)} buckets of <= {self.bucket_mb} MB"
        return f"{kind}, {self.comm.world} ranks"
