"""Worker functions for the data-parallel interface and composition tests (spawned ranks import them)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from course.parallel.comm import Comm
from course.parallel.data_parallel import DataParallel, shard_batch
from course.parallel.experiments import STRATEGIES, Setup, compare


class TiedMLP(nn.Module):
    """Not a course Transformer: a frozen parameter, a buffer, tied weights and an unused parameter."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.offset = nn.Parameter(torch.randn(8, generator=g), requires_grad=False)  # frozen
        self.register_buffer("scale", torch.rand(8, generator=g) + 0.5)
        self.unused = nn.Linear(3, 3)  # registered, never used in forward
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, y):
        h = self.emb(x) * self.scale + self.offset  # (B, T, 8)
        h = h + self.proj(F.gelu(self.fc(h)))
        logits = self.head(h)  # (B, T, 11)
        return logits, F.cross_entropy(logits.flatten(0, 1), y.flatten())


def _batches(steps: int):
    g = torch.Generator().manual_seed(7)
    return [(torch.randint(11, (8, 5), generator=g), torch.randint(11, (8, 5), generator=g)) for _ in range(steps)]


def _plain_loop(model, batches, rank, world, accumulate: int = 2):
    """User code written for PyTorch's DDP/FSDP interface: no_sync for accumulation, plain AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for x, y in batches:
        xs, ys = shard_batch(x, rank, world).chunk(accumulate), shard_batch(y, rank, world).chunk(accumulate)
        for i, (xm, ym) in enumerate(zip(xs, ys)):
            sync = i == accumulate - 1
            ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else _Null()
            with ctx:
                (model(xm, ym)[1] / accumulate).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def interface_run(kind: str, steps: int = 3) -> dict:
    """Each rank builds the module from its OWN seed (the wrapper must broadcast rank 0's state)."""
    from course.parallel.zero import shard
    rank, world = dist.get_rank(), dist.get_world_size()
    model = TiedMLP(seed=100 + rank).double()
    if kind in ("naive", "bucketed"):
        model = DataParallel(model, Comm(), bucket_mb=None if kind == "naive" else 1e-4, find_unused_parameters=True)
    elif kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    else:
        model = shard(model, Comm(), stage=int(kind[-1]), find_unused_parameters=True)
    _plain_loop(model, [(x, y) for x, y in _batches(steps)], rank, world)
    inner = model.module if hasattr(model, "module") else model
    state = model.full_state_dict() if hasattr(model, "full_state_dict") else {
        n: p.detach().clone() for n, p in inner.named_parameters()}
    state.update({f"buffer {n}": b.clone() for n, b in inner.named_buffers()})
    state["frozen offset"] = inner.offset.detach().clone()
    return state


def interface_runs(kinds) -> dict:
    return {k: interface_run(k) for k in kinds}


def unused_errors(kinds) -> dict:
    return {k: unused_without_flag(k) for k in kinds}


def interface_reference(steps: int = 3) -> dict:
    model = _plain_loop(TiedMLP(seed=100).double(), _batches(steps), 0, 1)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state.update({f"buffer {n}": b.clone() for n, b in model.named_buffers()})
    state["frozen offset"] = model.offset.detach().clone()
    return state


def unused_without_flag(kind: str) -> str:
    """The error a wrapper gives when a parameter gets no gradient and find_unused_parameters is off."""
    from course.parallel.zero import shard
    model = TiedMLP(seed=0).double()
    model = DataParallel(model, Comm()) if kind == "bucketed" else shard(model, Comm(), stage=int(kind[-1]))
    x, y = _batches(1)[0]
    try:
        model(x, y)[1].backward()
    except RuntimeError as e:
        return str(e)
    return "no error"


def composition(cases: list[tuple[str, str, str]]) -> list[dict]:
    """(recompute, strategy, attention) cases, each trained 3 steps and compared with one process."""
    out = []
    for recompute, strategy, attention in cases:
        setup = Setup(dtype="float64", n_layer=4, block_size=16, recompute=recompute, attention=attention)
        r = compare(setup, (strategy,))
        res = r["results"][strategy]
        out.append({"case": (recompute, strategy, attention), "max_abs_diff": res["max_abs_diff"],
                    "losses": res["losses"], "reference_losses": r["reference_losses"]})
    return out


__all__ = ["TiedMLP", "interface_run", "interface_reference", "unused_without_flag", "composition", "STRATEGIES"]


def mesh_vs_device_mesh(dims: dict) -> dict:
    """On every rank: course Mesh groups vs PyTorch DeviceMesh groups, and a Comm per dimension."""
    from course.parallel.mesh import Mesh
    rank = dist.get_rank()
    mesh = Mesh(**dims)
    dm = mesh.device_mesh("cpu")
    out = {"rank": rank, "coords": mesh.coords(rank), "dims": {}}
    for name in mesh.names:
        comm = mesh.comm(name)
        t = torch.ones(6) * (rank + 1)
        comm.all_reduce(t)
        out["dims"][name] = {"ours": mesh.group_of(name, rank),
                             "torch": sorted(dist.get_process_group_ranks(dm.get_group(name))),
                             "sum": t[0].item(), "comm": comm.summary()}
    return out
