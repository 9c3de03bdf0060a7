"""Sharded mixed precision on N ranks: course ZeRO-3 with a compute dtype beside FSDP2's MixedPrecisionPolicy.

Both keep fp32 master shards, gather 16-bit parameters for compute and reduce the gradients in a
chosen dtype (ZeRO section 3 / Micikevicius et al. 2018 section 3.1; FSDP2: `fully_shard(...,
mp_policy=MixedPrecisionPolicy(param_dtype, reduce_dtype))`). `sharded_step(setup, strategy, ...)`
runs on every rank (importable, so course.parallel.launch.run can spawn it) and returns the first
step's loss and whole gradient, and the losses and whole parameters after `setup.steps` steps of the
one loop; `autocast_step(setup, ...)` is the one-process reference (torch.autocast on the full batch).

gloo and 16-bit: on torch 2.13 gloo runs all_reduce, all_gather and reduce_scatter on bf16 and fp16
tensors (tests/test_mixed_precision.py checks it), so parameters are gathered in 16 bits; gradients
are reduced in fp32 by default because a 16-bit sum over N ranks rounds N-1 more times (and NCCL,
not gloo, is where a 16-bit reduction saves time).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..train import TrainConfig, train
from . import launch
from .comm import Comm
from .experiments import Setup, batch_fn, build_model

STRATEGIES = ("zero3", "fsdp2")


def shard_mixed(model, comm: Comm, strategy: str, param_dtype, reduce_dtype):
    """ZeRO-3 (course) or FSDP2 (PyTorch), each block a unit, gathering param_dtype, reducing in reduce_dtype."""
    if strategy == "zero3":
        from .zero import shard
        return shard(model, comm, stage=3, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if strategy != "fsdp2":
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = DeviceMesh.from_group(comm.group or dist.group.WORLD, launch.rank_device().type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().double().cpu()


def _whole_grads(model, comm: Comm) -> dict[str, torch.Tensor]:
    """Every parameter's averaged gradient, whole (ZeRO: gathered from the shards, padding cut)."""
    if hasattr(model, "_zero"):
        out = {}
        for p in model._zero.params:
            full = p.shard.grad.new_empty((p.per_rank * comm.world, *p.shard.shape[1:]))
            dist.all_gather_into_tensor(full, p.shard.grad.contiguous(), group=comm.group)
            out[p.name] = full[:p.rows].reshape(p.shape).double()
        return out
    return {n: _whole(p.grad) for n, p in model.named_parameters()}


def _params(model) -> dict[str, torch.Tensor]:
    if hasattr(model, "full_state_dict"):
        return {n: t.double() for n, t in model.full_state_dict().items()}
    return {n: _whole(p) for n, p in model.named_parameters()}


def _config(setup: Setup, autocast) -> TrainConfig:
    return TrainConfig(max_steps=setup.steps, batch_size=setup.batch_size, block_size=setup.block_size, lr=setup.lr,
                       warmup_steps=setup.warmup_steps, weight_decay=setup.weight_decay, grad_clip=setup.grad_clip,
                       eval_interval=setup.steps, eval_iters=1, seed=setup.seed, progress=False,
                       autocast_dtype=autocast)


def sharded_step(setup: Setup, strategy: str, param_dtype=torch.bfloat16, reduce_dtype=torch.float32) -> dict:
    """On every rank: {"loss0", "grads0", "losses", "params", "param_dtype"} (whole tensors, float64)."""
    comm = Comm()
    model = shard_mixed(build_model(setup), comm, strategy, param_dtype, reduce_dtype)
    x, y = batch_fn(setup, comm.rank, comm.world)("train")
    loss = model(x, y)[1]
    loss.backward()
    loss0 = float(loss.detach().double()) / comm.world
    t = torch.tensor([loss0], dtype=torch.float64)
    dist.all_reduce(t, group=comm.group)
    grads0 = _whole_grads(model, comm)
    model.zero_grad(set_to_none=True)
    hist = train(model, batch_fn(setup, comm.rank, comm.world), _config(setup, None), comm=comm)
    master = {str(p.dtype) for p in model.parameters()}
    return {"loss0": t.item(), "grads0": grads0, "losses": hist.train_loss, "params": _params(model),
            "master_dtype": master, "compute_dtype": str(param_dtype)}


def autocast_step(setup: Setup, dtype=torch.bfloat16) -> dict:
    """One process, full batch, fp32 parameters, torch.autocast(dtype): the same dict as sharded_step."""
    model = build_model(setup)
    x, y = batch_fn(setup)("train")
    with torch.autocast(device_type=x.device.type, dtype=dtype):
        loss = model(x, y)[1]
    loss.backward()
    out = {"loss0": float(loss.detach().double()),
           "grads0": {n: p.grad.detach().double() for n, p in model.named_parameters()}}
    model.zero_grad(set_to_none=True)
    hist = train(model, batch_fn(setup), _config(setup, dtype))
    return {**out, "losses": hist.train_loss, "params": _params(model)}


def compare(setup: Setup, strategies=STRATEGIES, param_dtype=torch.bfloat16, reduce_dtype=torch.float32) -> dict:
    """Run every strategy in this process group (one launch for both): strategy -> sharded_step's dict."""
    return {s: sharded_step(setup, s, param_dtype, reduce_dtype) for s in strategies}


def gloo_16bit(dtype=torch.bfloat16) -> dict:
    """What gloo's collectives return on `dtype` tensors, rank r contributing r+1 (exact in 16 bits)."""
    r, w = dist.get_rank(), dist.get_world_size()
    out = {}
    t = torch.full((4,), 1.0 + r, dtype=dtype)
    dist.all_reduce(t)
    out["all_reduce"] = (t.dtype, t.tolist())
    full = torch.empty(4 * w, dtype=dtype)
    dist.all_gather_into_tensor(full, torch.full((4,), 1.0 + r, dtype=dtype))
    out["all_gather"] = (full.dtype, full.tolist())
    mine = torch.empty(4, dtype=dtype)
    dist.reduce_scatter_tensor(mine, torch.full((4 * w,), 1.0 + r, dtype=dtype))
    out["reduce_scatter"] = (mine.dtype, mine.tolist())
    return out


def check_all(setup: Setup) -> dict:
    """One launch for the tests: gloo's 16-bit collectives, then both strategies in bf16 / fp32 reduce."""
    return {"gloo": {str(d): gloo_16bit(d) for d in (torch.bfloat16, torch.float16)}, "runs": compare(setup)}
