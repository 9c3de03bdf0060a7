"""ZeRO: shard optimizer state (stage 1), gradients (2) and parameters (3) over N data-parallel ranks.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models".
Model-state bytes per rank for Ψ parameters and mixed-precision Adam (fp16 params 2Ψ, fp16 grads
2Ψ, fp32 master params + momentum + variance K·Ψ with K = 12):

    DP        (2 + 2 + K)·Ψ           7.5B params on N = 64 GPUs:  120 GB
    ZeRO-1    2Ψ + 2Ψ + K·Ψ/N                                      31.4 GB
    ZeRO-2    2Ψ + (2 + K)·Ψ/N                                     16.6 GB
    ZeRO-3    (2 + 2 + K)·Ψ/N                                       1.9 GB

This code trains in fp32 (CPU, gloo): params 4Ψ, grads 4Ψ, AdamW exp_avg + exp_avg_sq 8Ψ (the fp32
params are the master copy), i.e. the same formulas with (P, G, K) = (4, 4, 8) instead of (2, 2, 12).

Layout: parameters are grouped per unit (one group per transformer block, one for everything else:
embeddings, final LayerNorm, tied head). A group is flattened into one buffer padded to a multiple
of N (Ψ below counts that padding, < N elements per group); rank r owns slice r of every group and
keeps AdamW state for its slices only.
- stage 1: full params and grads; after backward reduce-scatter each group's gradient, step my
  slice, all-gather the params: the two halves of an all-reduce, so the same bytes as DP.
- stage 2: as 1, but each group's gradient is reduce-scattered as soon as backward has produced all
  of it, and the full gradient freed: only 1/N of the gradients is kept.
- stage 3: only the slices are kept. A unit's params are all-gathered right before its forward and
  freed right after; autograd does not keep the weights either (saved_tensors_hooks store a note
  instead), so backward all-gathers the unit again when it first needs it, then reduce-scatters its
  gradient and frees it: 3 x (N-1)/N·Ψ per step = 1.5x DP. Every unit, the root included, is freed
  after forward, so the count is the paper's exactly (FSDP keeps the root gathered, saving one).

Tied weights: the model ties wte.weight and lm_head.weight (one Parameter in two modules). Groups are
built from unique parameters (deduplicated by identity, as model.parameters() does), so the tied
weight is stored, reduced and updated once; in stage 3 both modules receive the same view of the
gathered buffer, so the gradients of both uses add up in one place before the reduce-scatter.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from .comm import Comm
from .data_parallel import Strategy, broadcast_parameters, optimizer_state_tensors, storage_bytes

STAGES = (1, 2, 3)


def model_state_bytes(psi: float, world: int, stage: int, param_bytes: float = 2, grad_bytes: float = 2,
                      optim_bytes: float = 12) -> dict[str, float]:
    """Bytes of params, grads and optimizer state per rank (stage 0 = plain data parallelism).

    Defaults are the paper's mixed-precision Adam (2, 2, K=12); the fp32 code here is (4, 4, 8).
    """
    if stage not in (0, *STAGES):
        raise ValueError(f"stage must be 0 (plain DP), 1, 2 or 3, got {stage!r}")
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world!r}")
    P, G, K = param_bytes * psi, grad_bytes * psi, optim_bytes * psi
    out = {"params": P / world if stage >= 3 else P,
           "grads": G / world if stage >= 2 else G,
           "optimizer": K / world if stage >= 1 else K}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(param) -> every (module, attribute) that holds it (a tied weight has two)."""
    out: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((module, attr))
    return out


class FlatGroup:
    """One unit's parameters as one flat buffer padded to a multiple of N; rank r owns slice r."""

    def __init__(self, name: str, named_params: list[tuple[str, nn.Parameter]], world: int, rank: int):
        self.name = name
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.shapes = [p.shape for p in self.params]
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        self.numel = self.offsets[-1]
        self.padded = -(-self.numel // world) * world
        self.shard_numel = self.padded // world
        self.lo, self.hi = rank * self.shard_numel, (rank + 1) * self.shard_numel

    def flatten(self) -> torch.Tensor:
        p0 = self.params[0]
        pad = torch.zeros(self.padded - self.numel, dtype=p0.dtype, device=p0.device)
        return torch.cat([p.detach().reshape(-1) for p in self.params] + [pad])  # (padded,)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])
                for i, n in enumerate(self.names)}


class ZeRO(Strategy):
    """ZeRO stage 1, 2 or 3 around an unchanged course.model.Transformer (AdamW on the owned slices)."""

    def __init__(self, model: nn.Module, comm: Comm, stage: int, **adamw):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES} (1: optimizer state, 2: + gradients, "
                             f"3: + parameters), got {stage!r}")
        self.stage, self.comm = stage, comm
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weight once
        broadcast_parameters([p for _, p in named], comm)
        block_ids = [{id(p) for p in b.parameters()} for b in model.blocks]
        self.groups = [FlatGroup(f"block {i}", [(n, p) for n, p in named if id(p) in ids], comm.world, comm.rank)
                       for i, ids in enumerate(block_ids)]
        in_blocks = set().union(*block_ids)
        self.groups.append(FlatGroup("root", [(n, p) for n, p in named if id(p) not in in_blocks],
                                     comm.world, comm.rank))
        self.psi = sum(g.padded for g in self.groups)  # element count the formulas use
        self.sync = True
        if stage < 3:
            self._flatten_in_place()
            self.model = model
        else:
            self.units = [_Unit(g, comm, _places(model)) for g in self.groups]
            for i, unit in enumerate(self.units[:-1]):
                model.blocks[i] = _ShardedBlock(model.blocks[i], unit)
            self.model = _ShardedModel(model, self.units)
        self.optimizer = torch.optim.AdamW([g.shard for g in self.groups], **adamw)

    # ---------------------------------------------------------------- stages 1 and 2
    def _flatten_in_place(self):
        for g in self.groups:
            g.flat = g.flatten()
            for i, p in enumerate(g.params):  # the module's weights now live inside the flat buffer
                p.data = g.flat[g.offsets[i]:g.offsets[i + 1]].view(g.shapes[i])
            g.shard = nn.Parameter(g.flat[g.lo:g.hi])  # a view: updating my slice updates the model
            if self.stage == 1:  # full gradient buffer; p.grad are views, autograd adds into them
                g.flat_grad = torch.zeros_like(g.flat)
                for i, p in enumerate(g.params):
                    p.grad = g.flat_grad[g.offsets[i]:g.offsets[i + 1]].view(g.shapes[i])
                g.shard.grad = g.flat_grad[g.lo:g.hi]
            else:
                g.pending = len(g.params)
                for p in g.params:
                    p.register_post_accumulate_grad_hook(lambda p, g=g: self._grad_ready(g))

    def _grad_ready(self, g: FlatGroup) -> None:
        """Stage 2: once a group's gradient is complete, keep my reduced slice, free the rest."""
        g.pending -= 1
        if g.pending:
            return
        g.pending = len(g.params)
        full = torch.cat([p.grad.reshape(-1) for p in g.params]
                         + [g.flat.new_zeros(g.padded - g.numel)])  # (padded,)
        mine = full.new_empty(g.shard_numel)
        self.comm.reduce_scatter(mine, full, name=f"reduce-scatter {g.name}")
        mine.div_(self.comm.world)
        g.shard.grad = mine if g.shard.grad is None else g.shard.grad.add_(mine)
        for p in g.params:
            p.grad = None

    @contextmanager
    def no_sync(self):
        """Stage 1 accumulates full gradients locally; stages 2/3 hold only slices, so they must reduce
        every micro-batch (more communication for less memory) and accumulate the reduced slices."""
        self.sync = self.stage != 1
        try:
            yield
        finally:
            self.sync = True

    def backward(self, loss):
        Strategy.backward(self, loss)
        if self.stage == 1 and self.sync:
            for g in self.groups:
                mine = g.flat_grad.new_empty(g.shard_numel)
                self.comm.reduce_scatter(mine, g.flat_grad, name=f"reduce-scatter {g.name}")
                g.shard.grad.copy_(mine).div_(self.comm.world)

    def optimizer_step(self):
        self.optimizer.step()
        with torch.no_grad():
            for g in self.groups:
                if self.stage == 1:
                    g.flat_grad.zero_()
                else:
                    g.shard.grad = None
                if self.stage < 3:  # everyone gets everyone's updated slice back
                    self.comm.all_gather(g.flat, g.shard.detach().clone(), name=f"all-gather {g.name}")

    # ---------------------------------------------------------------- inspection
    def full_state_dict(self):
        out = {}
        for g in self.groups:
            if self.stage < 3:
                flat = g.flat
            else:
                flat = g.shard.new_empty(g.padded)
                self.comm.all_gather(flat, g.shard.detach(), name="gather state dict")
            out.update({n: t.clone() for n, t in g.unflatten(flat).items()})
        return out

    def grad_norm(self) -> float:
        sq = sum(g.shard.grad.double().pow(2).sum() for g in self.groups if g.shard.grad is not None)
        sq = torch.as_tensor(sq, dtype=torch.float64).reshape(1)
        if self.comm.world > 1:  # slices are disjoint: the squares add up (not counted as model traffic)
            torch.distributed.all_reduce(sq)
        return float(sq) ** 0.5

    def param_tensors(self):
        if self.stage < 3:
            return [g.flat for g in self.groups]
        return [g.shard for g in self.groups] + [u.full for u in self.units if u.full is not None]

    def grad_tensors(self):
        if self.stage == 1:
            return [g.flat_grad for g in self.groups]
        full = [p.grad for g in self.groups for p in g.params] if self.stage == 2 else []
        return [g.shard.grad for g in self.groups] + full


class _Unit:
    """Stage 3: one group's slice, and its full parameters only while a forward/backward needs them."""

    def __init__(self, g: FlatGroup, comm: Comm, places: dict):
        self.g, self.comm = g, comm
        self.places = [places[id(p)] for p in g.params]  # where to install each view (two for tied)
        g.shard = nn.Parameter(g.flatten()[g.lo:g.hi].clone())  # the only persistent copy: Ψ/N
        for holders in self.places:
            for module, attr in holders:
                del module._parameters[attr]  # the module keeps a plain tensor attribute instead
        self.full: torch.Tensor | None = None
        self.resident = False

    def gather(self):
        """Before forward: all-gather the full parameters into a fresh leaf and install views."""
        g = self.g
        full = torch.empty(g.padded, dtype=g.shard.dtype, device=g.shard.device)  # (padded,)
        self.comm.all_gather(full, g.shard.detach(), name=f"all-gather {g.name}")
        full.requires_grad_(True)
        full.register_post_accumulate_grad_hook(self._reduce_grad)
        for i, holders in enumerate(self.places):
            view = full[g.offsets[i]:g.offsets[i + 1]].view(g.shapes[i])
            for module, attr in holders:
                setattr(module, attr, view)
        self.full, self.resident = full, True

    def free(self):
        """Drop the full parameters' memory; the tensor (and autograd's views of it) stay, empty."""
        self.full.untyped_storage().resize_(0)
        self.resident = False

    def regather(self):
        """In backward, when a saved weight is first needed: fill the same storage again."""
        g = self.g
        self.full.untyped_storage().resize_(g.padded * self.full.element_size())
        with torch.no_grad():
            self.comm.all_gather(self.full.detach(), g.shard.detach(), name=f"all-gather {g.name} (bwd)")
        self.resident = True

    def _reduce_grad(self, full: torch.Tensor):
        """Backward produced this unit's whole gradient: reduce-scatter it, keep my slice, free all."""
        g = self.g
        mine = full.new_empty(g.shard_numel)
        self.comm.reduce_scatter(mine, full.grad, name=f"reduce-scatter {g.name}")
        mine.div_(self.comm.world)
        g.shard.grad = mine if g.shard.grad is None else g.shard.grad.add_(mine)
        full.grad = None
        self.free()
        self.full = None


class _ShardedBlock(nn.Module):
    def __init__(self, block: nn.Module, unit: _Unit):
        super().__init__()
        self.block, self.unit = block, unit

    def forward(self, x, attn_mask=None):
        self.unit.gather()
        out = self.block(x, attn_mask)  # (B, T, C)
        self.unit.free()
        return out


class _ShardedModel(nn.Module):
    """Gathers the root unit around the whole forward; saved weights become notes (pack/unpack)."""

    def __init__(self, model: nn.Module, units: list[_Unit]):
        super().__init__()
        self.inner, self.units, self.root = model, units, units[-1]

    def _pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        for unit in self.units:
            if unit.full is not None and unit.resident and ptr == unit.full.untyped_storage().data_ptr():
                return (unit, t.storage_offset(), tuple(t.shape), t.stride())  # a note, not the weight
        return t

    @staticmethod
    def _unpack(saved):
        if not isinstance(saved, tuple):
            return saved
        unit, offset, shape, stride = saved
        if not unit.resident:
            unit.regather()
        return unit.full.detach().as_strided(shape, stride, offset)

    def forward(self, *args, **kw):
        self.root.gather()
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            out = self.inner(*args, **kw)
        self.root.free()
        return out
