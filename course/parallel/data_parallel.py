"""Data parallelism: N ranks, one model copy each, N slices of the batch, one averaged gradient.

Each rank computes the gradient of the mean loss over its B/N sequences; the average of the N
gradients is the gradient of the mean loss over all B sequences, so after the same optimizer step
every copy holds exactly what one process would hold after training on the full batch.
The average is an all-reduce: 2(N-1)/N·Ψ elements sent per rank per step (see comm.py).

Two implementations plus PyTorch's own, all with the same small interface (`Strategy`):
- NaiveDP: after backward, all-reduce every gradient tensor, one after the other.
- BucketedDP: what torch DDP does (Li et al. 2020, "PyTorch Distributed"): parameters are put in
  buckets of `bucket_mb` in reverse order (the order backward produces their gradients); a hook
  fires when a gradient is final, and the bucket's all-reduce starts the moment its last gradient
  arrives, while backward keeps computing the earlier layers (overlap).
- TorchDDP / TorchFSDP2: torch.nn.parallel.DistributedDataParallel and FSDP2's fully_shard, for
  comparison; ZeRO-1/2/3 live in zero.py.

Gradient accumulation: inside `no_sync()` backward only accumulates local gradients; the one
all-reduce happens on the last micro-batch, so M micro-batches cost one all-reduce, not M.

Tied weights: model.parameters() yields each Parameter once (deduplicated by identity), so the tied
wte/lm_head weight is all-reduced once; autograd sums both uses' gradients before its hook fires.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from .comm import Comm


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters, each once even when shared (tied embeddings)."""
    return [p for p in model.parameters() if p.requires_grad]


def broadcast_parameters(params, comm: Comm) -> None:
    """Every rank starts from rank 0's weights (as DDP does at construction)."""
    with torch.no_grad():
        for p in params:
            comm.broadcast(p.data, src=0, name="broadcast params")


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


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):  # DTensor: what this rank holds
            t = t.to_local()
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """AdamW's exp_avg and exp_avg_sq (the per-element state; the scalar step counters are left out)."""
    out = []
    for p, state in optimizer.state.items():
        out += [v for v in state.values() if torch.is_tensor(v) and v.numel() == p.numel() and v.dim() > 0]
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # DTensor (FSDP2) -> whole tensor


class Strategy:
    """What the training loop needs: model(x, y) -> (logits, loss), backward(loss), optimizer_step(),
    no_sync(), full_state_dict() and model_state_bytes() (params / grads / optimizer held by this rank)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    comm: Comm

    def backward(self, loss: torch.Tensor) -> None:
        with self.comm.span("compute", "backward"):
            loss.backward()

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self):
        return nullcontext()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def param_tensors(self):
        return list(self.model.parameters())

    def grad_tensors(self):
        return [p.grad for p in self.model.parameters()]

    def grad_norm(self) -> float:
        """L2 norm of the synchronized gradient (what grad clipping would use); call after backward."""
        sq = sum(_full(p.grad).double().pow(2).sum() for p in self.model.parameters() if p.grad is not None)
        return float(sq) ** 0.5

    def model_state_bytes(self) -> dict[str, int]:
        out = {"params": storage_bytes(self.param_tensors()), "grads": storage_bytes(self.grad_tensors()),
               "optimizer": storage_bytes(optimizer_state_tensors(self.optimizer))}
        out["total"] = sum(out.values())
        return out


class NaiveDP(Strategy):
    """(1) After backward, all-reduce each gradient in turn and divide by N. Nothing overlaps."""

    def __init__(self, model: nn.Module, comm: Comm, **adamw):
        self.model, self.comm = model, comm
        self.params = unique_parameters(model)
        broadcast_parameters(self.params, comm)
        self.optimizer = torch.optim.AdamW(self.params, **adamw)
        self.sync = True

    @contextmanager
    def no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def backward(self, loss):
        super().backward(loss)
        if not self.sync:
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.comm.all_reduce(p.grad, name=f"grad {i}")
            p.grad.div_(self.comm.world)


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.buffer = torch.zeros(self.offsets[-1], dtype=params[0].dtype, device=params[0].device)  # (n,)
        self.pending = len(params)
        self.work = None


class BucketedDP(NaiveDP):
    """(2) DDP's design: bucketed all-reduce launched from gradient hooks, overlapping backward."""

    def __init__(self, model: nn.Module, comm: Comm, bucket_mb: float = 1.0, **adamw):
        if not isinstance(bucket_mb, (int, float)) or isinstance(bucket_mb, bool) or not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be a number > 0 (megabytes per bucket), got {bucket_mb!r}")
        super().__init__(model, comm, **adamw)
        cap = bucket_mb * 2**20
        self.buckets: list[_Bucket] = []
        current, size = [], 0
        for p in reversed(self.params):  # backward meets the last layers first
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

    def _grad_ready(self, p: torch.Tensor) -> None:
        """Runs inside backward once p.grad is final (both uses of a tied weight already summed)."""
        if not self.sync:
            return
        b, i = self.where[id(p)]
        bucket = self.buckets[b]
        bucket.buffer[bucket.offsets[i]:bucket.offsets[i + 1]].copy_(p.grad.view(-1))
        bucket.pending -= 1
        if bucket.pending == 0:  # last gradient of the bucket: ship it, backward goes on
            bucket.work = self.comm.all_reduce(bucket.buffer, async_op=True, name=f"bucket {b}")

    def backward(self, loss):
        Strategy.backward(self, loss)
        if not self.sync:
            return
        for bucket in self.buckets:
            if bucket.work is None:  # a parameter got no gradient this step: send what we have
                bucket.work = self.comm.all_reduce(bucket.buffer, async_op=True)
            bucket.work.wait()
            bucket.buffer.div_(self.comm.world)
            for i, p in enumerate(bucket.params):
                p.grad.copy_(bucket.buffer[bucket.offsets[i]:bucket.offsets[i + 1]].view_as(p))
            bucket.pending, bucket.work = len(bucket.params), None


class TorchDDP(Strategy):
    """torch.nn.parallel.DistributedDataParallel with the same bucket size (C++ reducer, same idea)."""

    def __init__(self, model: nn.Module, comm: Comm, bucket_mb: float = 1.0, **adamw):
        from torch.nn.parallel import DistributedDataParallel
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb!r}")
        self.comm = comm
        self.model = DistributedDataParallel(model, bucket_cap_mb=bucket_mb)
        self.optimizer = torch.optim.AdamW(unique_parameters(model), **adamw)

    def no_sync(self):
        return self.model.no_sync()

    def full_state_dict(self):
        return {n: p.detach().clone() for n, p in self.model.module.named_parameters()}


class TorchFSDP2(Strategy):
    """PyTorch's FSDP2: fully_shard each block, then the root (ZeRO-3 with per-parameter DTensor shards)."""

    def __init__(self, model: nn.Module, comm: Comm, **adamw):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from .launch import rank_device
        self.comm = comm
        mesh = init_device_mesh(rank_device().type, (comm.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optimizer = torch.optim.AdamW(unique_parameters(model), **adamw)

    @contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def full_state_dict(self):
        return {n: p.full_tensor().detach().clone() for n, p in self.model.named_parameters()}


def train_step(strategy: Strategy, micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
               measure_memory: bool = False, sync_every_micro_batch: bool = False) -> tuple[float, dict | None]:
    """One optimizer step over M micro-batches; gradients are communicated on the last one only.

    sync_every_micro_batch=True is the wasteful version (M all-reduces, same result) for comparison.
    Returns (mean loss, model-state bytes measured after the gradient sync, before the update, and
    the synchronized gradient's norm there).
    """
    comm, M, total = strategy.comm, len(micro_batches), 0.0
    for i, (x, y) in enumerate(micro_batches):
        skip = i < M - 1 and not sync_every_micro_batch
        with (strategy.no_sync() if skip else nullcontext()):
            with comm.span("compute", "forward"):
                _, loss = strategy.model(x, y)
            strategy.backward(loss / M)  # mean over micro-batches = mean over the whole batch
        total += loss.item() / M
    memory = None
    if measure_memory:
        memory = strategy.model_state_bytes()
        memory["grad_norm"] = strategy.grad_norm()
    with comm.span("compute", "optimizer"):
        strategy.optimizer_step()
    return total, memory
