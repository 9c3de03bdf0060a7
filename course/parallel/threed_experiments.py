"""The 3D-parallel experiment (lesson 08, tests, `python -m course.parallel.threed`): the tiny
transformer trained by `course.parallel.threed` on a data x pipeline x tensor mesh and by one process
on the same batches, compared parameter by parameter, plus where each rank runs (torchrun's
GROUP_RANK / LOCAL_RANK against the mesh's nodes).

    python -m course.parallel.threed --dp 2 --pp 2 --tp 2 --gpus-per-node 4     # 8 spawned ranks
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model import ModelConfig, Transformer
from ..recompute import policy_of
from .data_parallel import shard_batch
from .threed import ORDER, make_mesh


@dataclass
class Setup:
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 16
    vocab_size: int = 32
    seq_len: int = 8
    batch_size: int = 8  # global batch: split over dp, then into micro-batches
    micro_batches: int = 2
    schedule: str = "1f1b"
    virtual_stages: int = 1  # stages per rank, for schedule="interleaved"
    steps: int = 3
    lr: float = 1e-2
    grad_clip: float = 0.5  # small enough that every step clips: the norm must be right
    seed: int = 0
    dtype: str = "float64"

    def model(self) -> Transformer:
        torch.manual_seed(self.seed)
        cfg = ModelConfig.gpt(vocab_size=self.vocab_size, block_size=self.seq_len, n_layer=self.n_layer,
                              n_head=self.n_head, n_embd=self.n_embd)
        return Transformer(cfg).to(device=_device(), dtype=getattr(torch, self.dtype))

    def train_config(self):
        from ..train import TrainConfig
        return TrainConfig(max_steps=self.steps, batch_size=self.batch_size, block_size=self.seq_len, lr=self.lr,
                           warmup_steps=1, eval_interval=self.steps, eval_iters=1, progress=False,
                           grad_clip=self.grad_clip, seed=self.seed)

    def batches(self, rank: int = 0, world: int = 1):
        """batch_fn for the loop: step k's global batch, rows of data rank `rank` of `world`."""
        count = {"train": 0, "val": 0}

        def fn(split):
            g = torch.Generator().manual_seed(1000 * (split == "val") + self.seed * 7919 + count[split])
            count[split] += 1
            x = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=g)
            x = x.to(_device())
            return shard_batch(x[:, :-1], rank, world), shard_batch(x[:, 1:], rank, world)
        return fn


def _device():
    from .launch import rank_device
    return rank_device()


def _nodes() -> dict:
    """Where this process runs, as torchrun tells it (None outside torchrun)."""
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE")}
    return {k.lower(): None if v is None else int(v) for k, v in env.items()} | {"host": socket.gethostname()}


def run_3d(setup: Setup, dp: int, pp: int, tp: int, recompute: str = "none", zero1: bool = False,
           gpus_per_node: int | None = None) -> dict:
    """On every rank: train the 3D model and one process on the same batches; this rank's largest
    parameter difference, the losses and gradient norms of both, and where the rank sits."""
    from ..parallelize import Plan, parallelize
    from ..train import train
    mesh = make_mesh(dp, pp, tp, gpus_per_node)
    plan = Plan(tensor_parallel=tp > 1, recompute=recompute, shard="zero1" if zero1 else None,
                pipeline=setup.schedule, micro_batches=setup.micro_batches, virtual_stages=setup.virtual_stages)
    rank, cfg = dist.get_rank(), setup.train_config()
    model = parallelize(setup.model(), plan, mesh=mesh)
    every, opt = [], []

    def hook(event, state):
        if event == "after_backward":  # before clipping: the norm every copy would give
            every.append(state.model.grad_norm_every_copy())
        opt[:] = [state.optimizer]
    hist = train(model, setup.batches(mesh.coords(rank)["data"], dp), cfg, comm=model.dp, hooks=[hook])
    ref_model = setup.model()
    ref = train(ref_model, setup.batches(), cfg)
    full = dict(ref_model.named_parameters())
    diff = 0.0
    for st in model.stages.values():
        for name, q in st.named_parameters():
            want = full[st.full_name(name)].detach()
            if hasattr(q, "tp_dim"):
                want = want.index_select(q.tp_dim, q.tp_indices[model.tp_rank])
            diff = max(diff, (q.detach() - want).abs().max().item())
    local = getattr(opt[0], "optim", opt[0])  # ZeroRedundancyOptimizer keeps its rank's AdamW in .optim
    opt_state = sum(t.numel() for s in local.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    comms = {"tensor": model.tp, "pipeline": model.comm, "data": model.dp}
    return {"rank": rank, "coords": mesh.coords(rank), "nodes": _nodes(), "param_diff": diff,
            "loss": hist.train_loss, "ref_loss": ref.train_loss, "val": hist.val_loss, "ref_val": ref.val_loss,
            "grad_norm": hist.grad_norm, "ref_norm": ref.grad_norm, "every_copy_norm": every,
            "bytes": {k: (c.total_bytes if c is not None else 0.0) for k, c in comms.items()},
            "groups": {d: mesh.groups(d) for d in ORDER}, "params_here": sum(q.numel() for q in model.parameters()),
            "opt_state": opt_state, "optimizer": type(opt[0]).__name__,
            "recompute": sorted({policy_of(st) for st in model.stages.values()})}


def check_nodes(results: list[dict], gpus_per_node: int | None) -> dict:
    """Under torchrun: ranks numbered node by node (RANK = GROUP_RANK·LOCAL_WORLD_SIZE + LOCAL_RANK),
    every tensor group on one node, and the mesh's idea of a node (rank // gpus_per_node) = torchrun's."""
    by_rank = {r["rank"]: r["nodes"] for r in results}
    if any(n["group_rank"] is None for n in by_rank.values()):
        return {"checked": False}
    per_node = by_rank[0]["local_world_size"]
    placed = all(n["rank"] == n["group_rank"] * per_node + n["local_rank"] for n in by_rank.values())
    tensor = results[0]["groups"]["tensor"]
    inside = all(len({by_rank[r]["group_rank"] for r in g}) == 1 for g in tensor)
    match = all(r // gpus_per_node == n["group_rank"] for r, n in by_rank.items()) if gpus_per_node else None
    return {"checked": True, "consecutive": placed, "tensor_inside_node": inside, "mesh_node_is_group_rank": match,
            "group_rank_of_rank": [by_rank[r]["group_rank"] for r in sorted(by_rank)],
            "local_rank_of_rank": [by_rank[r]["local_rank"] for r in sorted(by_rank)], "tensor_groups": tensor}


def suite(setup: Setup, cases, gpus_per_node=None) -> list[dict]:
    """Several (dp, pp, tp, recompute, zero1) cases in one launch (starting 8 ranks costs seconds)."""
    return [run_3d(setup, *case, gpus_per_node=gpus_per_node) for case in cases]


def summary(results: list[dict], gpus_per_node: int | None = None) -> dict:
    """One line for all ranks: the largest differences from one process and the node check."""
    r0 = next(r for r in results if r["rank"] == 0)
    loss = max(abs(a - b) for r in results for a, b in zip(r["loss"], r["ref_loss"]))
    norm = max(abs(a - b) for r in results for a, b in zip(r["grad_norm"], r["ref_norm"]))
    return {"mesh": {d: len(r0["groups"][d][0]) for d in ORDER}, "param_diff": max(r["param_diff"] for r in results),
            "loss_diff": loss, "grad_norm_diff": norm, "grad_norm": r0["grad_norm"], "ref_norm": r0["ref_norm"],
            "every_copy_norm": r0["every_copy_norm"], "optimizer": r0["optimizer"], "recompute": r0["recompute"],
            "nodes": check_nodes(results, gpus_per_node)}


def _torchrun_job(setup: Setup, args) -> dict | None:
    """Under torchrun: this rank's run, gathered to rank 0, which returns the summary."""
    gpn = args.gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None
    res = run_3d(setup, args.dp, args.pp, args.tp, args.recompute, args.zero1, gpn)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, res)
    if dist.get_rank() != 0:
        return None
    return summary(every, gpn)
