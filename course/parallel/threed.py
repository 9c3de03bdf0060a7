"""3D parallelism: data x pipeline x tensor on one rank mesh, trained by the one loop.

    mesh = make_mesh(dp=2, pp=2, tp=2, gpus_per_node=4)            # Mesh(pipeline, data, tensor)
    plan = Plan(tensor_parallel=True, pipeline="1f1b", micro_batches=2, recompute="full", shard="zero1")
    model = parallelize(Transformer(cfg), plan, mesh=mesh)
    hist = train(model, batch_fn, TrainConfig(...), comm=mesh.comm("data"))

    python -m course.parallel.threed --dp 2 --pp 2 --tp 2                # spawns 8 ranks (threed_experiments)
    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=4 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:PORT -m course.parallel.threed --dp 2 --pp 2 --tp 2   # two nodes

PTD-P (Narayanan et al. 2021, "Efficient large-scale language model training on GPU clusters
using Megatron-LM", section 3.2, takeaway #1): tensor parallelism inside a node, where its all-reduces (four per
layer and micro-batch) ride NVLink; pipeline parallelism across nodes, where only one (b, s, h)
activation per micro-batch and stage boundary crosses the slow link; data parallelism over
replicas of the whole pipeline. The rank grid is Megatron-LM's order: tensor fastest, then data,
then pipeline (`ORDER`), so with torchrun's numbering (consecutive ranks on one node) a tensor group
is inside a node whenever tp divides the GPUs per node (`make_mesh` checks it).

The pieces are the chapters' own, in `course.parallelize`'s order: attention -> tensor
(`apply_tensor_parallel` on the mesh's "tensor" groups) -> recomputation -> pipeline (this file:
the split model cut into `Stage`s run by a schedule on the mesh's "pipeline" groups, a
`PipelineModel` behind the loop's interface) -> data parallelism (the gradients averaged over the
"data" group once the schedule is done) with optionally ZeRO-1: PyTorch's ZeroRedundancyOptimizer
(its implementation of ZeRO stage 1, Rajbhandari et al. 2020 section 5.1: each data-parallel rank
keeps the AdamW state of 1/N of the parameters, updates those and broadcasts them).

Gradient clipping needs the norm of the one model's gradient, so each parameter must be counted
once although copies of it live on several ranks (Megatron-LM's clip_grad_norm_fp32 does the same
bookkeeping): shards of a tensor-parallel matrix are disjoint (summed over the tensor group); a
parameter tensor parallelism leaves whole (LayerNorms, row-parallel biases, position embedding) is
identical on every tensor rank (counted on tensor rank 0 only); the head's copy of the tied
embedding on the last stage is the same parameter as stage 0's wte (skipped); data-parallel replicas
hold the same averaged gradient (not summed). `grad_norm_every_copy` is the wrong count, for contrast.

Context parallelism as a fourth dimension does not compose here cheaply: `run_schedule` sizes every
activation message from the whole sequence, the first stage takes whole token rows, and the last
stage's loss is a mean over its tokens; each would have to become sequence-shard aware (positions,
receive buffers, a loss averaged over the context group). Sequence parallelism is refused for the
same kind of reason: its LayerNorm gradients are summed by hooks a copied stage does not keep.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
from dataclasses import asdict

import torch
import torch.distributed as dist

from ..recompute import apply_policy
from .mesh import Mesh
from .pipeline import PipelineModel, Stage
from .schedules import SCHEDULES, make
from .vocab import vocab_parallel_cross_entropy

ORDER = ("pipeline", "data", "tensor")  # outermost first: Megatron-LM's rank order (tensor fastest)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def make_mesh(dp: int, pp: int, tp: int, gpus_per_node: int | None = None, world_size: int | None = None) -> Mesh:
    """The rank grid Mesh(pipeline=pp, data=dp, tensor=tp); ValueError naming the constraint it breaks
    (dp·pp·tp = world size; a tensor group inside one node) and the nearest layout that keeps it."""
    for name, v in (("dp", dp), ("pp", pp), ("tp", tp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else dp * pp * tp
    if dp * pp * tp != world_size:
        near = f"dp={world_size // (pp * tp)} (pp={pp}, tp={tp}) fits" if world_size % (pp * tp) == 0 else \
            f"choose pp·tp among the divisors {_divisors(world_size)}"
        raise ValueError(f"dp·pp·tp must equal the world size: {dp}·{pp}·{tp} = {dp * pp * tp} != {world_size} "
                         f"ranks; {near}")
    if gpus_per_node is not None:
        if not isinstance(gpus_per_node, int) or isinstance(gpus_per_node, bool) or gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be a positive integer or None, got {gpus_per_node!r}")
        if gpus_per_node % tp:  # consecutive ranks, tensor fastest: a group stays in a node iff tp | gpus_per_node
            ok = [d for d in _divisors(gpus_per_node) if world_size % d == 0]
            t = max(d for d in ok if d <= tp) if any(d <= tp for d in ok) else 1
            raise ValueError(f"constraint: a tensor group must stay inside one node (its all-reduces run in every "
                             f"layer), so tp must divide gpus_per_node={gpus_per_node}; tp={tp} does not. Nearest "
                             f"valid: tp={t} with dp={world_size // (pp * t)}" if world_size % (pp * t) == 0 else
                             f"constraint: tp must divide gpus_per_node={gpus_per_node}; tp={tp} does not (use tp={t})")
    mesh = Mesh(world_size=world_size, gpus_per_node=gpus_per_node, pipeline=pp, data=dp, tensor=tp)
    if gpus_per_node is not None:
        mesh.check_within_node("tensor")
    return mesh


def check_plan(plan) -> None:
    """What `Plan(pipeline=...)` accepts (called by Plan itself)."""
    if plan.pipeline not in SCHEDULES:
        raise ValueError(f"Plan.pipeline must be None or one of {SCHEDULES}, got {plan.pipeline!r}")
    for name in ("micro_batches", "virtual_stages"):
        v = getattr(plan, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"Plan.{name} must be a positive integer, got {v!r}")
    if plan.shard not in (None, "zero1"):
        raise ValueError(f"Plan.shard={plan.shard!r} with Plan.pipeline: only None or 'zero1' (optimizer state over "
                         f"the data ranks); ZeRO-2/3 would reduce or gather inside the schedule's backward passes")
    if plan.data_parallel is not None:
        raise ValueError(f"Plan.data_parallel={plan.data_parallel!r} with Plan.pipeline: the 3D model averages "
                         f"gradients over the mesh's 'data' ranks itself; leave data_parallel=None")
    if plan.sequence_parallel:
        raise ValueError("Plan.sequence_parallel=True with Plan.pipeline is not supported: its LayerNorm gradient "
                         "hooks do not survive cutting the model into stages; use sequence_parallel=False")


class TensorParallelStage(Stage):
    """A last stage whose head is column-parallel: logits (b, T, V/t), the vocabulary-parallel loss."""

    def loss(self, logits, targets, n_tokens):
        valid = (targets != -100).sum()  # the loss is a mean over this micro-batch's tokens: rescale to the batch
        return vocab_parallel_cross_entropy(logits, targets, self.tp_comm, self.vocab_start) * (valid / n_tokens)


class ThreeDModel(PipelineModel):
    """This rank's pipeline stages of a (tensor-parallel) model, data-parallel over mesh "data"."""

    def __init__(self, model, plan, mesh: Mesh):
        p = mesh.size("pipeline")
        super().__init__(model, make(plan.pipeline, p, plan.micro_batches, plan.virtual_stages), mesh.comm("pipeline"))
        self.mesh, self.dp, self.zero1 = mesh, mesh.comm("data"), plan.shard == "zero1"
        self.tp = getattr(model, "tp_comm", None)
        self.tp_rank = self.tp.rank if self.tp is not None else 0
        full = dict(model.named_parameters())  # the split model: shards carry tp_dim / tp_indices
        for st in self.stages.values():
            for name, q in st.named_parameters():
                for attr in ("tp_dim", "tp_indices"):  # a deepcopy drops a Parameter's attributes
                    if hasattr(full[st.full_name(name)], attr):
                        setattr(q, attr, getattr(full[st.full_name(name)], attr))
            if self.tp is not None and st.is_last:
                head = copy.deepcopy(model.lm_head)  # ColumnParallelLinear: f (all-reduce in backward), V/t logits
                head.weight = st.lm_head.weight  # the stage's own copy of the tied embedding shard
                st.lm_head, st.tp_comm, st.vocab_start = head, self.tp, model.wte.start
                st.__class__ = TensorParallelStage
            if plan.recompute != "none":  # the policy, planned again over this stage's blocks
                apply_policy(st, plan.recompute, plan.recompute_k)

    def sync_grads(self, stages: dict) -> None:
        """Tied embedding summed over the pipeline group, then every gradient averaged over "data"."""
        super().sync_grads(stages)
        grads = [q.grad for q in self.parameters() if q.grad is not None]
        if self.dp.world > 1 and grads:
            flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket: one all-reduce per step
            self.dp.all_reduce(flat, name="data-parallel gradients")
            flat /= self.dp.world
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))

    def _head(self):
        key = str(self.schedule.n_stages - 1)
        return self.stages[key].lm_head.weight if key in self.stages else None

    def _squares(self, every_copy: bool = False) -> torch.Tensor:
        head = self._head()
        sq = torch.zeros(1, dtype=torch.float64, device=next(self.parameters()).device)
        for q in self.parameters():
            if q.grad is None or (q is head and not every_copy):
                continue  # the head's copy of wte: counted once, on stage 0
            if every_copy or hasattr(q, "tp_dim") or self.tp_rank == 0:  # whole under TP: on tensor rank 0
                sq += q.grad.double().pow(2).sum()
        return sq

    def clip_grad_norm_(self, max_norm: float) -> float:
        """torch's clip_grad_norm_ of the one model: squares summed over the tensor and pipeline groups,
        each parameter once (module docstring). Returns the norm before clipping."""
        sq = self._squares()
        if self.tp is not None:
            dist.all_reduce(sq, group=self.tp.group)
        dist.all_reduce(sq, group=self.comm.group)
        norm = math.sqrt(sq.item())
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for q in self.parameters():
                if q.grad is not None:
                    q.grad.mul_(coef)
        return norm

    def grad_norm_every_copy(self) -> float:
        """The wrong count, for contrast: every rank's every gradient, replicas and copies included."""
        sq = self._squares(every_copy=True)
        dist.all_reduce(sq)
        return math.sqrt(sq.item())

    def make_optimizer(self, cfg):
        """AdamW with the loop's decay groups; with ZeRO-1 PyTorch's ZeroRedundancyOptimizer over "data"."""
        from ..train import make_optimizer
        if not self.zero1:
            return make_optimizer(self, cfg)
        from torch.distributed.optim import ZeroRedundancyOptimizer
        groups = make_optimizer(self, cfg).param_groups
        return ZeroRedundancyOptimizer([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                       optimizer_class=torch.optim.AdamW, process_group=self.dp.group,
                                       lr=cfg.lr, betas=cfg.betas)


def pipeline_3d(model, plan, mesh) -> ThreeDModel:
    """parallelize()'s pipeline step: `model` already has attention, tensor parallelism and recomputation."""
    if mesh is None or "pipeline" not in mesh.dims:
        raise ValueError("Plan.pipeline needs mesh=, a course.parallel.mesh.Mesh with a 'pipeline' dimension "
                         "(course.parallel.threed.make_mesh(dp, pp, tp))")
    if plan.tensor_parallel != (mesh.dims.get("tensor", 1) > 1):
        raise ValueError(f"Plan.tensor_parallel={plan.tensor_parallel} but the mesh's tensor dimension is "
                         f"{mesh.dims.get('tensor', 1)}: set tensor_parallel=True exactly when tp > 1")
    return ThreeDModel(model, plan, mesh)


def main(argv=None):
    from . import launch
    from .threed_experiments import Setup, _torchrun_job, run_3d, summary
    ap = argparse.ArgumentParser(description="A 3D-parallel run (data x pipeline x tensor) vs one process")
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--recompute", default="none", help="a course.recompute policy, e.g. full")
    ap.add_argument("--zero1", action="store_true", help="ZeRO-1 over the data ranks")
    ap.add_argument("--schedule", default="1f1b", help=f"one of {SCHEDULES}")
    ap.add_argument("--micro-batches", type=int, default=2, help="per data-parallel rank and step")
    ap.add_argument("--virtual-stages", type=int, default=1, help="stages per rank (interleaved)")
    ap.add_argument("--gpus-per-node", type=int, default=None, help="default: torchrun's LOCAL_WORLD_SIZE")
    ap.add_argument("--out", default=None, help="write rank 0's JSON summary here too")
    args = ap.parse_args(argv)
    setup = Setup(schedule=args.schedule, micro_batches=args.micro_batches, virtual_stages=args.virtual_stages)
    if launch.under_torchrun():
        out = launch.main(_torchrun_job, setup, args)[0]
    else:
        world = args.dp * args.pp * args.tp
        make_mesh(args.dp, args.pp, args.tp, args.gpus_per_node, world)  # bad input fails before spawning
        values = launch.run(run_3d, world, setup, args.dp, args.pp, args.tp, args.recompute, args.zero1,
                            args.gpus_per_node, timeout=600).values
        out = summary(values, args.gpus_per_node)
    if out is not None:
        out["setup"] = asdict(setup)
        print(json.dumps(out))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(out, f)


if __name__ == "__main__":
    main()
