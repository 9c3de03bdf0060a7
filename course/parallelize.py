"""Apply a plan of techniques to an unchanged model, in one documented order (torchtitan's way).

    model = parallelize(Transformer(cfg), Plan(recompute="sqrt", shard="zero3"), comm=Comm())
    hist = train(model, batch_fn, TrainConfig(...), comm=comm)     # the one loop, as for one process

The model (`course.model`) knows nothing of any technique. Each step below replaces parts of it in
place with parts of the same shape, or wraps it the way PyTorch's own wrappers do, and the order
is fixed because each step must see what the earlier ones made (torchtitan's `parallelize_llama`
applies tensor parallel -> activation checkpointing -> compile -> FSDP in the same spirit):

  1. attention      every layer's attention core: `set_attention(model, plan.attention)`
                    (block-sparse, written out, memory-efficient; a core sees q, k, v per head, so
                    it must come before anything that splits heads or wraps blocks)
  2. tensor         split matrices, heads and the vocabulary across the "tensor" ranks of the mesh,
                    optionally LayerNorm/dropout along the sequence too (chapter 06:
                    `course.parallel.tensor.apply_tensor_parallel`)
  3. recomputation  `course.recompute.apply_policy`: a runner over the blocks, or a wrapper around
                    each core; blocks stay blocks, so the next step still finds them
  4. sharding       ZeRO-1/2/3 (`course.parallel.zero.shard`) or PyTorch's FSDP2 `fully_shard`,
                    unit by unit over the blocks, then the root: parameters become shards
  5. data parallel  `DataParallel` (naive or bucketed, course.parallel.data_parallel) or PyTorch's
                    `DistributedDataParallel`: the outermost wrapper, it averages the gradients

With `Plan.pipeline` (a schedule name) and a mesh with a "pipeline" dimension, steps 4-5 are the
3D composition of `course.parallel.threed`: the (tensor-parallel, recomputed) model is cut into
pipeline stages run by the schedule, gradients are averaged over the mesh's "data" ranks, and
shard="zero1" partitions the optimizer state over them (Narayanan et al. 2021, section 3).

Sharding already averages gradients over the data-parallel ranks, so `shard` and `data_parallel`
exclude each other; a combination that cannot work raises a ValueError naming both.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch.nn as nn

from .model import set_attention
from .recompute import POLICIES, apply_policy

SHARDING = ("zero1", "zero2", "zero3", "fsdp2")
DATA_PARALLEL = ("naive", "bucketed", "ddp")
ORDER = ("attention", "tensor", "recomputation", "sharding", "data parallel")


@dataclass
class Plan:
    attention: Callable[[int], nn.Module] | None = None  # make_core(layer index) -> attention core
    recompute: str = "none"  # a course.recompute policy
    recompute_k: int | None = None  # for "every-k"
    shard: str | None = None  # one of SHARDING
    data_parallel: str | None = None  # one of DATA_PARALLEL
    bucket_mb: float = 25.0  # bucketed DP and torch DDP
    find_unused_parameters: bool = False
    tensor_parallel: bool = False  # Megatron-LM tensor parallelism over the mesh's "tensor" ranks (or the world)
    sequence_parallel: bool = False  # with tensor_parallel: LayerNorm, dropout on T/t tokens (Korthikanti 2022)
    pipeline: str | None = None  # a course.parallel.schedules name: cut into stages over the mesh's "pipeline" ranks
    micro_batches: int = 1  # with pipeline: micro-batches per step (per data-parallel rank)
    virtual_stages: int = 1  # with pipeline="interleaved": stages per rank

    def __post_init__(self):
        if self.attention is not None and not callable(self.attention):
            raise ValueError(f"Plan.attention must be None or a function layer_index -> attention core, "
                             f"got {self.attention!r}")
        if self.recompute not in POLICIES:
            raise ValueError(f"Plan.recompute must be one of {POLICIES}, got {self.recompute!r}")
        if self.shard is not None and self.shard not in SHARDING:
            raise ValueError(f"Plan.shard must be None or one of {SHARDING}, got {self.shard!r}")
        if self.data_parallel is not None and self.data_parallel not in DATA_PARALLEL:
            raise ValueError(f"Plan.data_parallel must be None or one of {DATA_PARALLEL}, got {self.data_parallel!r}")
        if self.shard is not None and self.data_parallel is not None:
            raise ValueError(f"Plan.shard={self.shard!r} already averages gradients over the data-parallel ranks; "
                             f"Plan.data_parallel={self.data_parallel!r} would do it a second time: set one of them")
        if self.sequence_parallel and not self.tensor_parallel:
            raise ValueError("Plan.sequence_parallel=True splits what Plan.tensor_parallel leaves whole; it needs "
                             "Plan.tensor_parallel=True")
        if self.pipeline is not None:
            from .parallel.threed import check_plan
            check_plan(self)
        for name in ("shard", "data_parallel"):
            if self.tensor_parallel and self.pipeline is None and getattr(self, name) is not None:
                raise ValueError(f"Plan.tensor_parallel=True with Plan.{name}={getattr(self, name)!r} is not supported: "
                                 f"their gradient clipping would see only this rank's tensor-parallel shards; use "
                                 f"one of them")

    def __repr__(self) -> str:
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                 if getattr(self, f.name) != f.default and f.name != "attention"]
        if self.attention is not None:
            parts.insert(0, f"attention={getattr(self.attention, '__name__', type(self.attention).__name__)}")
        return f"Plan({', '.join(parts)})"


def parallelize(model: nn.Module, plan: Plan, comm=None, mesh=None) -> nn.Module:
    """Apply `plan` to `model` in the order above; returns the model (or its data-parallel wrapper).

    comm: the course Comm over the data-parallel ranks (default: the whole world);
    mesh: a course.parallel.mesh.Mesh, whose "data" dimension is used instead when given."""
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a course.parallelize.Plan, got {type(plan).__name__}")
    if plan.attention is not None:  # 1. attention
        set_attention(model, plan.attention)
    if plan.tensor_parallel:  # 2. tensor
        from .parallel.comm import Comm
        from .parallel.tensor import apply_tensor_parallel
        apply_tensor_parallel(model, mesh if mesh is not None else Comm(name="tensor"),
                              sequence_parallel=plan.sequence_parallel)
    if plan.recompute != "none":  # 3. recomputation
        apply_policy(model, plan.recompute, plan.recompute_k)
    if plan.pipeline is not None:  # 4-5. stages over the pipeline ranks, ZeRO-1 and data parallel over the data ranks
        from .parallel.threed import pipeline_3d
        return pipeline_3d(model, plan, mesh)
    if plan.shard is None and plan.data_parallel is None:
        return model
    from .parallel.comm import Comm
    if mesh is not None:
        comm = mesh.comm("data")
    comm = comm or Comm()
    if plan.shard in ("zero1", "zero2", "zero3"):  # 4. sharding
        from .parallel.zero import shard
        return shard(model, comm, stage=int(plan.shard[-1]), find_unused_parameters=plan.find_unused_parameters)
    if plan.shard == "fsdp2":
        return _fully_shard(model, comm, mesh)
    if plan.data_parallel in ("naive", "bucketed"):  # 5. data parallel
        from .parallel.data_parallel import DataParallel
        return DataParallel(model, comm, bucket_mb=None if plan.data_parallel == "naive" else plan.bucket_mb,
                            find_unused_parameters=plan.find_unused_parameters)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, process_group=comm.group, bucket_cap_mb=plan.bucket_mb,
                                   find_unused_parameters=plan.find_unused_parameters)


def _fully_shard(model: nn.Module, comm, mesh):
    """PyTorch's FSDP2: each block, then the root (ZeRO-3 with per-parameter DTensor shards)."""
    from torch.distributed.fsdp import fully_shard
    from .parallel.launch import rank_device
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    if mesh is not None:
        device_mesh = mesh.device_mesh(rank_device().type)["data"]
    elif comm.group is None:
        device_mesh = init_device_mesh(rank_device().type, (comm.world,))
    else:
        device_mesh = DeviceMesh.from_group(comm.group, rank_device().type)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=device_mesh)
    return fully_shard(model, mesh=device_mesh)
