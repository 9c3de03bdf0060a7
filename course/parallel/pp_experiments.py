"""Pipeline experiments run on every rank of a process group (lesson 07, tests, benchmark).

    torchrun --standalone --nproc-per-node=2 -m course.parallel.pp_experiments          # check + time
    python -m course.parallel.pp_experiments --nproc 4                                  # spawn 4 ranks

- `check(setup, cases)`: each (schedule, m, v) on the same batch; loss and every gradient against
  the unsplit model on the same batch, measured peak live activations, the timeline.
- `timed(setup, cases, repeats)`: the same with every compute action padded to a fixed time
  (`action_seconds`), for bubbles that can be compared with the simulator and the formulas.
- `torch_pipelining(setup, cases)`: PyTorch's torch.distributed.pipelining on the same stages.
- `train_both(setup, name, m, v, steps)`: a few steps of `course.train.train` with a PipelineModel
  and with the unsplit model.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model import ModelConfig, Transformer
from .comm import Comm
from .mesh import Mesh
from .pipeline import PipelineModel, rank_stages, run_schedule, sync_tied_grads
from .schedules import Action, make


@dataclass
class Setup:
    n_layer: int = 8
    n_head: int = 2
    n_embd: int = 32
    vocab_size: int = 64
    seq_len: int = 16
    batch_size: int = 8
    dtype: str = "float64"  # equality checks in float64; timing in float32
    seed: int = 0
    layer_seconds: float = 0.0  # timed(): each action padded to layer_seconds x layers (F), 2x that (B)

    def model(self) -> Transformer:
        torch.manual_seed(self.seed)  # the same model on every rank
        cfg = ModelConfig.gpt(vocab_size=self.vocab_size, block_size=self.seq_len, n_layer=self.n_layer,
                              n_head=self.n_head, n_embd=self.n_embd)
        return Transformer(cfg).to(getattr(torch, self.dtype))

    def batch(self, step: int = 0):
        g = torch.Generator().manual_seed(1000 + self.seed + step)
        x = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=g)
        return x, torch.roll(x, -1, dims=1)


def _comm() -> Comm:
    return Mesh(pipeline=dist.get_world_size()).comm("pipeline")


def action_seconds(setup: Setup, schedule):
    """Fixed time per action: layer_seconds per layer of the stage for F, I and W, twice that for B.
    Sleeping ranks do not compete for the cores, so 4 ranks on 2 cores keep their timing."""
    layers = setup.n_layer // schedule.n_stages
    return lambda a: setup.layer_seconds * layers * (2.0 if a.kind == "B" else 1.0)


def _reference(setup: Setup):
    model = setup.model()
    x, y = setup.batch()
    _, loss = model(x, y)
    loss.backward()
    return loss.item(), {n: q.grad.clone() for n, q in model.named_parameters()}


def _one(setup, name, m, v, comm, ref=None, pad=False, split_backward=True):
    sched = make(name, comm.world, m, v)
    stages = rank_stages(setup.model(), sched, comm.rank, split_backward)
    x, y = setup.batch()
    dist.barrier(group=comm.group)  # start together: the timeline is one step of all ranks
    res = run_schedule(stages, sched, comm, x, y, action_time=action_seconds(setup, sched) if pad else None)
    sync_tied_grads(stages, comm, sched.n_stages)
    out = {"schedule": name, "m": m, "v": v, "rank": comm.rank, "loss": res.loss, "spans": res.spans,
           "peak_live": res.peak_live, "peak_bytes": res.peak_bytes, "sent_bytes": res.sent_bytes,
           "order": [name for _, name, _, _ in res.spans]}
    if ref is not None:
        ref_loss, ref_grads = ref
        missing = [n for st in stages.values() for n, q in st.named_parameters() if q.grad is None]
        if missing:
            raise RuntimeError(f"{name} m={m} v={v} rank {comm.rank}: no gradient for {missing}")
        # float64: the same sums in another order differ by a few ulps of the largest term
        out["grad_rel_diff"] = max((q.grad - ref_grads[st.full_name(n)]).abs().max().item()
                                   / ref_grads[st.full_name(n)].abs().max().clamp_min(1e-30).item()
                                   for st in stages.values() for n, q in st.named_parameters())
        out["n_grads"] = sum(1 for st in stages.values() for q in st.parameters() if q.grad is not None)
        out["n_params"] = sum(1 for st in stages.values() for _ in st.parameters())
        out["loss_diff"] = None if res.loss is None else abs(res.loss - ref_loss)
    return out


def check(setup: Setup, cases) -> list[dict]:
    """Every (schedule, m, v) case on this rank, checked against the unsplit model."""
    comm, ref = _comm(), _reference(setup)
    return [_one(setup, name, m, v, comm, ref) for name, m, v in cases]


def timed(setup: Setup, cases, repeats: int = 2) -> list[dict]:
    """Each case with padded action times; of `repeats` runs the one with the shortest step."""
    comm, out = _comm(), []
    for name, m, v in cases:
        runs = [_one(setup, name, m, v, comm, pad=True) for _ in range(repeats)]
        spans = [None] * len(runs)
        for i, run in enumerate(runs):  # the step's length as all ranks saw it
            t = torch.tensor([min(s for _, _, s, _ in run["spans"]), -max(e for _, _, _, e in run["spans"])],
                             dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=comm.group)
            spans[i] = -t[1].item() - t[0].item()
        out.append(runs[min(range(repeats), key=spans.__getitem__)])
    return out


def torch_pipelining(setup: Setup, cases) -> list[dict]:
    """PyTorch's own schedules on the same stages (plain nn.Linear), loss and gradients vs the unsplit model."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as ts

    comm, (ref_loss, ref_grads) = _comm(), _reference(setup)
    classes = {"gpipe": ts.ScheduleGPipe, "1f1b": ts.Schedule1F1B, "interleaved": ts.ScheduleInterleaved1F1B,
               "zb-h1": ts.ScheduleInterleavedZeroBubble}
    out = []
    for name, m, v in cases:
        sched = make(name, comm.world, m, v)
        stages = rank_stages(setup.model(), sched, comm.rank, split_backward=False)
        x, y = setup.batch()
        n_tokens = y.numel()
        pipes = [PipelineStage(st, s, sched.n_stages, torch.device("cpu"), group=comm.group) for s, st in stages.items()]
        loss_fn = lambda logits, t: F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1),  # noqa: E731
                                                    reduction="sum") / (n_tokens / m)
        single = name in ("gpipe", "1f1b")
        runner = classes[name](pipes[0] if single else pipes, n_microbatches=m, loss_fn=loss_fn)
        losses = []
        if 0 in stages:
            runner.step(x, target=y, losses=losses)
        else:
            runner.step(target=y, losses=losses)
        sync_tied_grads(stages, comm, sched.n_stages)
        diffs = [(q.grad - ref_grads[st.full_name(n)]).abs().max().item() for st in stages.values()
                 for n, q in st.named_parameters()]
        loss = sum(float(l) for l in losses) / m if losses else None
        order = None
        if hasattr(runner, "pipeline_order"):
            order = [str(a) for a in runner.pipeline_order[comm.rank] if a is not None]
        out.append({"schedule": name, "m": m, "v": v, "rank": comm.rank, "grad_diff": max(diffs),
                    "loss_diff": None if loss is None else abs(loss - ref_loss), "order": order,
                    "ours": [str(a) for a in sched.compute(comm.rank)]})
    return out


def train_both(setup: Setup, name: str, m: int, v: int = 1, steps: int = 3) -> dict:
    """`course.train.train` for a few steps with a PipelineModel, and with the unsplit model (same batches)."""
    from ..train import TrainConfig, train

    comm = _comm()
    cfg = TrainConfig(max_steps=steps, batch_size=setup.batch_size, block_size=setup.seq_len, lr=3e-3,
                      warmup_steps=1, eval_interval=steps, eval_iters=1, progress=False, grad_clip=0.05)
    batches = iter(setup.batch(i) for i in range(10 * steps))
    fixed = setup.batch(999)
    batch_fn = lambda split: next(batches) if split == "train" else fixed  # noqa: E731

    pipe = PipelineModel(setup.model(), make(name, comm.world, m, v), comm)
    hist = train(pipe, batch_fn, cfg)
    batches = iter(setup.batch(i) for i in range(10 * steps))
    plain = setup.model()
    ref = train(plain, batch_fn, cfg)
    full = dict(plain.named_parameters())
    diff = max((q - full[st.full_name(n)]).abs().max().item() for st in pipe.stages.values()
               for n, q in st.named_parameters())
    return {"rank": comm.rank, "pipe_loss": hist.train_loss, "ref_loss": ref.train_loss, "param_diff": diff,
            "pipe_val": hist.val_loss, "ref_val": ref.val_loss, "grad_norm": hist.grad_norm, "ref_norm": ref.grad_norm}


def main(argv=None):
    from . import launch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn when not under torchrun")
    ap.add_argument("--m", type=int, default=4)
    args = ap.parse_args(argv)
    setup = Setup()
    cases = [("gpipe", args.m, 1), ("1f1b", args.m, 1), ("zb-h1", args.m, 1)]
    for values in [launch.main(check, setup, cases, nproc=args.nproc)]:
        for r in values:
            if r["rank"] == 0:
                print(json.dumps({k: v for k, v in r.items() if k not in ("spans", "order")}))


if __name__ == "__main__":
    main()
