"""ZeRO: shard optimizer state (stage 1), gradients (2) and parameters (3) over N data-parallel ranks.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models",
section 5. Model-state bytes per rank (`course.costs.model_state_bytes`; mixed-precision Adam: 2Ψ
params, 2Ψ grads, KΨ optimizer with K = 12; the fp32 CPU code here: 4, 4, 8):

    DP        (2 + 2 + K)·Ψ           7.5B params on N = 64 GPUs:  120 GB
    ZeRO-1    2Ψ + 2Ψ + K·Ψ/N                                      31.4 GB
    ZeRO-2    2Ψ + (2 + K)·Ψ/N                                     16.6 GB
    ZeRO-3    (2 + 2 + K)·Ψ/N                                       1.9 GB

`shard(model, comm, stage)` changes the model in place, the way PyTorch's FSDP2 `fully_shard` does:
every parameter is cut along dim 0 (padded to a multiple of N rows) and the registered Parameter
becomes this rank's rows, under the same name. So `model.parameters()` are shards, and a plain
optimizer built over them (`torch.optim.AdamW(model.parameters())`, or course.train's decay groups,
which look at dims) keeps optimizer state for 1/N of the model: that *is* ZeRO's optimizer
sharding. While a unit (a transformer block, or the rest of the model: the "root") computes, the
whole parameter is gathered and registered instead; gradients are averaged with the same
reduce-scatter that cuts them:
- stage 1: full gradients accumulate locally; at the end of backward each is reduce-scattered and
  the rank keeps its rows (a view of the full gradient buffer, which stays: Ψ of gradients). The
  updated rows are all-gathered before the next forward: reduce-scatter + all-gather = the two
  halves of an all-reduce, so the same bytes as DP, 2(N-1)/N·Ψ.
- stage 2: as 1, but a unit's gradients are reduce-scattered as soon as backward has produced all of
  them, and the full gradients freed: 1/N of the gradients is kept. Under no_sync() it still reduces
  every micro-batch (it holds no full gradient to accumulate into) and adds the reduced rows.
- stage 3: parameters too. A unit is gathered before its forward and freed after it (the storage is
  released; autograd keeps the tensor object), gathered again when backward reaches its output (a
  gradient hook on the unit's outputs, FSDP's pre-backward hook) and freed after its gradients are
  reduce-scattered: 3(N-1)/N·Ψ per step = 1.5x DP. The root is freed after forward too, so the count
  is the paper's exactly (FSDP keeps the root gathered, saving one all-gather).
Recomputation composes: a checkpointed unit runs forward again inside backward, finds itself
gathered, and is not freed until its gradients are reduced.
Tied weights (wte / lm_head): one Parameter in two modules, sharded once; both modules get the same
gathered tensor, so both uses' gradients add up before the reduce-scatter. A parameter may not be
shared between two units. Frozen parameters and buffers are broadcast from rank 0 and kept whole.
Unused parameters follow `course.parallel.data_parallel` (an error, or find_unused_parameters=True).

Mixed precision (stage 3; ZeRO section 3 assumes it, Micikevicius et al. 2018 section 3.1):
`param_dtype=torch.bfloat16` keeps the registered shards in fp32 (the master weights the optimizer
updates) and gathers 16-bit copies for compute, so the all-gather and the gathered parameters cost
half the bytes; gradients come out of backward in param_dtype and are cast to `reduce_dtype`
(default: the master dtype, fp32) before the reduce-scatter, so the sum over ranks and the shard's
gradient are kept exactly (to fp32). FSDP2's `MixedPrecisionPolicy(param_dtype, reduce_dtype)` is
the same design (tests/test_mixed_precision.py checks the two agree).
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn

from .comm import Comm
from .data_parallel import broadcast_state, queue_end_of_backward

STAGES = (1, 2, 3)


class _Param:
    """One parameter: rank r's rows (`shard`, registered between steps) and the whole (`full`)."""

    def __init__(self, name: str, p: nn.Parameter, holders, comm: Comm, stage: int,
                 param_dtype=None, reduce_dtype=None):
        self.name, self.holders, self.shape, self.comm = name, holders, p.shape, comm
        rows = p.shape[0] if p.dim() else 1
        rest = tuple(p.shape[1:])
        self.rows, self.per_rank = rows, math.ceil(rows / comm.world)
        self.reduce_dtype = reduce_dtype or p.dtype
        master = p.new_zeros((self.per_rank * comm.world, *rest))  # (N*c, ...) padded, p's dtype
        master[:rows].copy_(p.detach().reshape(rows, *rest))
        self.full = master if param_dtype in (None, p.dtype) else master.to(param_dtype)  # what computes
        lo, hi = comm.rank * self.per_rank, (comm.rank + 1) * self.per_rank
        mine = master[lo:hi]  # (c, ...) this rank's rows, full precision
        self.shard = nn.Parameter(mine if stage < 3 else mine.clone())  # stage 1/2: a view of full
        self.whole = nn.Parameter(self.full[:rows].view(self.shape))  # shares full's storage
        self.grad_buffer = None
        if stage == 1:  # full gradient buffer: autograd accumulates into the view
            self.grad_buffer = torch.zeros_like(self.full)
            self.whole.grad = self.grad_buffer[:rows].view(self.shape)
        self.slice = slice(lo, hi)
        self.version = self.full._version  # the optimizer's in-place update of `shard` changes it


    @property
    def padded_numel(self) -> int:
        return self.full.numel()

    def register(self, whole: bool):
        p = self.whole if whole else self.shard
        for module, attr in self.holders:
            module._parameters[attr] = p

    def gather(self, name: str):
        if self.full.untyped_storage().nbytes() == 0:
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
        # Autograd may hold `whole` (a view of full) for backward: refilling the same memory with the
        # same values must not count as modifying it (FSDP2 does the same for its all-gather outputs)
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(self.full):
            self.comm.all_gather(self.full, self.shard.detach().to(self.full.dtype, copy=True), name=name)
        self.version = self.full._version

    def free(self):
        self.full.untyped_storage().resize_(0)

    def reduce(self, name: str):
        """Average the full gradient over ranks and keep my rows as shard.grad."""
        mine = self.shard.new_empty(self.shard.shape, dtype=self.reduce_dtype)
        if self.grad_buffer is not None:  # stage 1: the accumulated full gradient is already padded
            self.comm.reduce_scatter(mine, self.grad_buffer, name=name)
            self.grad_buffer[self.slice].copy_(mine.div_(self.comm.world))
            self.shard.grad = self.grad_buffer[self.slice]
            return
        rest, dt = self.full.shape[1:], self.reduce_dtype
        padded = self.full.new_zeros(self.full.shape, dtype=dt) if self.whole.grad is None else torch.cat(
            [self.whole.grad.reshape(self.rows, *rest).to(dt),
             self.full.new_zeros((self.full.size(0) - self.rows, *rest), dtype=dt)])  # (N*c, ...)
        self.comm.reduce_scatter(mine, padded, name=name)
        mine = mine.div_(self.comm.world).to(self.shard.dtype)
        self.shard.grad = mine if self.shard.grad is None else self.shard.grad.add_(mine)
        self.whole.grad = None


class _Unit:
    """The parameters one module owns (a block, or the root): gathered and reduced together."""

    def __init__(self, name: str, params: list[_Param]):
        self.name, self.params = name, params
        self.resident, self.ready = True, set()


class ZeROModule:
    """Mixed into the sharded model's class (as FSDP2 does): no_sync, clip_grad_norm_, full_state_dict."""

    @contextmanager
    def no_sync(self):
        z = self._zero
        before, z.sync = z.sync, False
        try:
            yield
        finally:
            z.sync = before

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """torch.nn.utils.clip_grad_norm_ over the whole model: the squares of the shards' gradients add up."""
        z = self._zero
        grads = [p.shard.grad for p in z.params if p.shard.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64, device=z.params[0].full.device)
        for g in grads:
            sq += g.double().pow(2).sum()
        if z.comm.world > 1:  # the shards are disjoint (not model traffic, so not counted)
            torch.distributed.all_reduce(sq, group=z.comm.group)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's rule
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total.to(grads[0].dtype if grads else torch.float32).squeeze()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole (gathered; not counted as training traffic), by its original name."""
        z, out = self._zero, {}
        for p in z.params:
            full = p.shard.new_empty(p.full.shape)
            full[p.slice] = p.shard.detach()
            if z.comm.world > 1:
                torch.distributed.all_gather_into_tensor(full, p.shard.detach().contiguous(), group=z.comm.group)
            out[p.name] = full[:p.rows].reshape(p.shape).detach().clone()
        for name, p in self.named_parameters():  # frozen parameters are kept whole on every rank
            if not p.requires_grad:
                out[name] = p.detach().clone()
        return out

    @property
    def zero_psi(self) -> int:
        """Parameters counted with their padding (what the model-state formulas take as Ψ)."""
        return self._zero.psi

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """What this rank holds, for course.measure.state_bytes: parameter and gradient storages."""
        z = self._zero
        params = [p.shard for p in z.params] + [p.full for p in z.params if p.full.untyped_storage().nbytes()]
        grads = [p.shard.grad for p in z.params] + [p.whole.grad for p in z.params] + \
                [p.grad_buffer for p in z.params]
        frozen = [p for p in self.parameters() if not p.requires_grad]
        return {"params": params + frozen, "grads": [g for g in grads if g is not None]}


class _State:
    def __init__(self, comm, stage, params, units, find_unused):
        self.comm, self.stage, self.params, self.units = comm, stage, params, units
        self.find_unused, self.sync, self.phase = find_unused, True, "forward"
        self.fresh_grads, self.queued, self.order, self.next = False, False, [], 0
        self.unit_of = {id(p.whole): u for u in units for p in u.params}
        self.names = {id(p.whole): p.name for p in params}

    @property
    def psi(self) -> int:
        """Element count the formulas use: every parameter padded to a multiple of N rows."""
        return sum(p.padded_numel for p in self.params)


def shard(model: nn.Module, comm: Comm | None = None, stage: int = 3, units=None,
          find_unused_parameters: bool = False, param_dtype: torch.dtype | None = None,
          reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard `model` in place with ZeRO stage 1, 2 or 3 over `comm`'s ranks. Returns the model.

    units: the modules gathered and reduced as one (default: each of model.blocks); everything
    else belongs to the root unit, the model itself. param_dtype / reduce_dtype (stage 3): the
    dtype parameters are gathered and computed in, and the one gradients are reduced in."""
    if stage not in STAGES or isinstance(stage, bool):
        raise ValueError(f"stage must be one of {STAGES} (1: optimizer state, 2: + gradients, 3: + parameters), "
                         f"got {stage!r}")
    for arg, dt in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dt is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            raise ValueError(f"{arg} must be None or a floating torch.dtype (e.g. torch.bfloat16), got {dt!r}")
    if stage < 3 and (param_dtype, reduce_dtype) != (None, None):
        raise ValueError(f"param_dtype/reduce_dtype need stage=3 (stage {stage} keeps whole parameters in "
                         f"their own dtype); got stage={stage}")
    if isinstance(model, ZeROModule):
        raise ValueError("this model is already sharded with ZeRO; build a fresh model to shard it again")
    comm = comm or Comm()
    broadcast_state(model, comm)
    units = list(units) if units is not None else list(getattr(model, "blocks", []))
    holders: dict[int, list] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and p.requires_grad:
                holders.setdefault(id(p), []).append((module, attr))
    owner: dict[int, int] = {}
    for u, module in enumerate(units):
        for p in module.parameters():
            if id(p) in owner and owner[id(p)] != u:
                raise ValueError(f"a parameter is shared by units {owner[id(p)]} and {u}: ZeRO gathers one unit at a "
                                 f"time, so shared parameters must live in one unit (or in the root)")
            owner[id(p)] = u
    names = {id(p): n for n, p in model.named_parameters()}  # tied: the first name, as named_parameters gives
    params, by_unit = [], [[] for _ in range(len(units) + 1)]
    for n, p in model.named_parameters():
        if p.requires_grad:
            zp = _Param(names[id(p)], p, holders[id(p)], comm, stage, param_dtype, reduce_dtype)
            params.append(zp)
            by_unit[owner.get(id(p), len(units))].append(zp)
    if not params:
        raise ValueError("shard: the model has no trainable parameters")
    unit_objs = [_Unit(f"block {i}" if i < len(units) else "root", ps) for i, ps in enumerate(by_unit)]
    model._zero = z = _State(comm, stage, params, unit_objs, find_unused_parameters)
    for zp in params:
        zp.register(whole=False)
        zp.whole.register_post_accumulate_grad_hook(lambda t, z=z: _grad_ready(z, t))
    for module, unit in zip(units + [model], unit_objs):
        if unit.params:
            module.register_forward_pre_hook(lambda m, args, z=z, u=unit: _pre_forward(z, u))
            module.register_forward_hook(lambda m, args, out, z=z, u=unit: _post_forward(z, u, out))
        unit.resident = stage < 3
        if stage == 3:
            for zp in unit.params:
                zp.free()
    cls = type(model)
    model.__class__ = type(f"ZeRO{cls.__name__}", (ZeROModule, cls), {})
    return model


def _pre_forward(z: _State, unit: _Unit):
    if z.phase == "backward":  # a recomputation inside backward: stay gathered until reduced
        _ensure_resident(z, unit)
    else:
        if torch.is_grad_enabled():
            z.order.append(unit)
        if z.stage == 3:
            _ensure_resident(z, unit)
        elif unit is z.units[-1]:  # the root runs first: refresh every unit once the optimizer stepped
            if any(zp.full._version != zp.version for zp in z.params):
                for u in z.units:
                    for zp in u.params:
                        zp.gather(f"all-gather {u.name}")
            if z.stage == 1 and z.fresh_grads and torch.is_grad_enabled():
                for zp in z.params:  # the first micro-batch of a step accumulates from zero
                    zp.grad_buffer.zero_()
                z.fresh_grads = False
    for zp in unit.params:
        zp.register(whole=True)


def _ensure_resident(z: _State, unit: _Unit):
    if not unit.resident:
        for zp in unit.params:
            zp.gather(f"all-gather {unit.name}" + (" (bwd)" if z.phase == "backward" else ""))
        unit.resident = True


def _post_forward(z: _State, unit: _Unit, out):
    if z.phase == "backward":
        return
    if not torch.is_grad_enabled():  # eval / generate: no backward will come
        for zp in unit.params:
            zp.register(whole=False)
        if z.stage == 3:
            _free(unit)
        return
    if z.stage == 3:
        _free(unit)
    for t in (out if isinstance(out, (tuple, list)) else [out]):
        if isinstance(t, torch.Tensor) and t.requires_grad:
            t.register_hook(lambda g, z=z, u=unit: _pre_backward(z, u, g))


def _free(unit: _Unit):
    for zp in unit.params:
        zp.free()
    unit.resident = False


def _pre_backward(z: _State, unit: _Unit, grad):
    z.phase = "backward"
    _ensure_resident(z, unit)
    return grad


def _grad_ready(z: _State, whole: torch.Tensor):
    if not z.queued:
        z.queued = True
        queue_end_of_backward(lambda: _finish(z))
    z.unit_of[id(whole)].ready.add(id(whole))
    if z.stage >= 2:
        _reduce_ready(z)


def _reduce_ready(z: _State):
    """Reduce-scatter every complete unit, strictly in reverse forward order (the same on every rank)."""
    order = list(reversed(z.order))
    while z.next < len(order) and len(order[z.next].ready) == len(order[z.next].params):
        for zp in order[z.next].params:
            zp.reduce(f"reduce-scatter {order[z.next].name}")
        if z.stage == 3:
            _free(order[z.next])
        z.next += 1


def _finish(z: _State):
    """End of backward: parameters that got no gradient, stage 1's reduction, shards registered again."""
    z.queued = False
    syncing = z.sync or z.stage >= 2  # stage 1 under no_sync only accumulates
    if syncing:
        got = [id(zp.whole) in z.unit_of[id(zp.whole)].ready for zp in z.params]
        if not all(got) and not z.find_unused:
            missing = [zp.name for zp, g in zip(z.params, got) if not g]
            _reset(z)
            raise RuntimeError(f"ZeRO: parameter(s) {missing} received no gradient in this backward (unused in "
                               f"forward). Pass find_unused_parameters=True, or freeze them with requires_grad_(False).")
        used = None
        if z.find_unused:  # which parameters got a gradient on some rank (a small all-reduce)
            used = torch.tensor(got, dtype=torch.float32, device=z.params[0].full.device)
            z.comm.all_reduce(used, name="used-parameter flags")
        if z.stage == 1:
            for u in reversed(z.units):
                for zp in u.params:
                    zp.reduce(f"reduce-scatter {u.name}")
            z.fresh_grads = True
        else:  # units that never completed (unused parameters, skipped units) count as zero here
            z.order += [u for u in z.units if u not in z.order][::-1]
            for u in z.units:
                u.ready.update(id(zp.whole) for zp in u.params)
            _reduce_ready(z)
        if used is not None:
            for zp, flag in zip(z.params, used.tolist()):
                if flag == 0:
                    zp.shard.grad = None  # unused on every rank: what one process would have
        _reset(z)
    for zp in z.params:
        zp.register(whole=False)
    z.order, z.next, z.phase = [], 0, "forward"


def _reset(z: _State):
    for u in z.units:
        u.ready.clear()
    z.order, z.next, z.phase = [], 0, "forward"
