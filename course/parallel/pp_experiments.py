"""Pipeline experiments run on every rank of a process group (lesson 07, tests, benchmark).

    torchrun --standalone --nproc-per-node=2 -m course.parallel.pp_experiments      # check + time
    python -m course.parallel.pp_experiments --ranks 4 --micro-batches 8            # spawn 4 ranks

- `check(setup, cases)`: each (schedule, m, v) on the same batch; loss and every gradient against
  the unsplit model, measured peak live activations, the timeline.
- `timed(setup, cases)`: the same with every compute action padded to a fixed time (see
  `action_seconds`), for bubbles that can be compared with the simulator and the formulas.
- `torch_pipelining(setup, cases)`: PyTorch's torch.distributed.pipelining on the same stages, in
  a thread with a timeout (pipelining on gloo has hung before): a hang is reported, not waited for.
- `train_both(setup, name, m, v, steps)`: `course.train.train` with a PipelineModel and with the
  unsplit model on the same batches.
- `suite` (tests) and `lesson` (lesson 07) run several of these in one launch.
The pipeline is the "pipeline" dimension of a `course.parallel.mesh.Mesh` (`dims`, default: all ranks).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model import ModelConfig, Transformer
from .comm import Comm
from .mesh import Mesh
from .pipeline import PipelineModel, rank_stages, run_schedule, sync_tied_grads
from .schedules import make


@dataclass
class Setup:
    n_layer: int = 8
    n_head: int = 2
    n_embd: int = 16
    vocab_size: int = 32
    seq_len: int = 8
    batch_size: int = 8
    dtype: str = "float64"  # equality checks in float64; timing in float32
    seed: int = 0
    layer_seconds: float = 0.01  # timed(): forward time per layer (see action_seconds)

    def model(self) -> Transformer:
        torch.manual_seed(self.seed)  # the same model on every rank
        cfg = ModelConfig.gpt(vocab_size=self.vocab_size, block_size=self.seq_len, n_layer=self.n_layer,
                              n_head=self.n_head, n_embd=self.n_embd)
        return Transformer(cfg).to(getattr(torch, self.dtype))

    def batch(self, step: int = 0):
        g = torch.Generator().manual_seed(1000 + self.seed + step)
        x = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=g)  # (B, T)
        return x, torch.roll(x, -1, dims=1)


def _comm(dims=None) -> Comm:
    return Mesh(**(dims or {"pipeline": dist.get_world_size()})).comm("pipeline")


def action_seconds(setup: Setup, schedule):
    """Equal stages on a CPU: every action lasts a fixed time, layer_seconds per layer of its stage for
    F, I and W, twice that for B (backward = 2 forwards; I = W = F as in Qi et al. 2023). The real
    compute (a tiny model) is far shorter and the rest is a sleep: sleeping ranks do not compete
    for cores, so 4 ranks on 2 cores keep this timing."""
    layers = setup.n_layer // schedule.n_stages
    return lambda a: setup.layer_seconds * layers * (2.0 if a.kind == "B" else 1.0)


def _reference(setup: Setup):
    model = setup.model()
    _, loss = model(*setup.batch())
    loss.backward()
    return loss.item(), {n: q.grad.clone() for n, q in model.named_parameters()}


def _grad_diff(stages, ref_grads) -> float:
    """Largest |pipeline - unsplit| of a gradient relative to that gradient's largest entry."""
    missing = [n for st in stages.values() for n, q in st.named_parameters() if q.grad is None]
    if missing:
        raise RuntimeError(f"no gradient for {missing}")
    return max((q.grad - ref_grads[st.full_name(n)]).abs().max().item()
               / ref_grads[st.full_name(n)].abs().max().clamp_min(1e-300).item()
               for st in stages.values() for n, q in st.named_parameters())


def _one(setup, name, m, v, comm, ref=None, pad=False):
    sched = make(name, comm.world, m, v)
    stages = rank_stages(setup.model(), sched, comm.rank)
    x, y = setup.batch()
    dist.barrier(group=comm.group)  # start together: the timeline is one step of all ranks
    res = run_schedule(stages, sched, comm, x, y, action_time=action_seconds(setup, sched) if pad else None)
    sync_tied_grads(stages, comm, sched.n_stages)
    out = {"schedule": name, "m": m, "v": v, "rank": comm.rank, "loss": res.loss, "spans": res.spans,
           "peak_live": res.peak_live, "peak_bytes": res.peak_bytes, "sent_bytes": res.sent_bytes,
           "overruns": res.overruns}
    if ref is not None:
        out["grad_rel_diff"] = _grad_diff(stages, ref[1])
        out["loss_diff"] = None if res.loss is None else abs(res.loss - ref[0])
    return out


def check(setup: Setup, cases, dims=None) -> list[dict]:
    """Every (schedule, m, v) case on this rank, checked against the unsplit model."""
    comm, ref = _comm(dims), _reference(setup)
    return [_one(setup, name, m, v, comm, ref) for name, m, v in cases]


def link_seconds(comm: Comm, shape, dtype=torch.float32, repeats: int = 21) -> tuple[float, float]:
    """One-way time of one activation message between group ranks 0 and 1, from round trips: (fastest,
    median). The fastest is a lower bound on every message's latency; the median includes the usual
    wait for a blocked rank to be woken and scheduled, which on a busy machine is most of it."""
    t, trips = torch.zeros(shape, dtype=dtype), []
    for _ in range(repeats):
        dist.barrier(group=comm.group)
        start = time.perf_counter()
        if comm.rank == 0:
            comm.send(t, 1)
            comm.recv(t, 1)
        elif comm.rank == 1:
            comm.recv(t, 0)
            comm.send(t, 0)
        trips.append(time.perf_counter() - start)
    out = torch.tensor([min(trips) / 2, sorted(trips)[len(trips) // 2] / 2], dtype=torch.float64)
    comm.broadcast(out, 0)
    return out[0].item(), out[1].item()


def timed(setup: Setup, cases, repeats: int = 2, dims=None) -> dict:
    """Each case with padded action times; of `repeats` runs the one with the shortest step. Plus the link."""
    comm, out = _comm(dims), []
    _one(setup, *cases[0], comm)  # warm-up: the first backward of a process pays one-time costs
    for name, m, v in cases:
        runs, lengths = [_one(setup, name, m, v, comm, pad=True) for _ in range(repeats)], []
        for run in runs:  # the step's length as all ranks saw it: latest end - earliest start
            t = torch.tensor([min(s for _, _, s, _ in run["spans"]), -max(e for _, _, _, e in run["spans"])],
                             dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=comm.group)
            lengths.append(-t[1].item() - t[0].item())
        out.append(runs[min(range(repeats), key=lengths.__getitem__)])
    shape = (setup.batch_size // max(m for _, m, _ in cases), setup.seq_len, setup.n_embd)
    fastest, median = link_seconds(comm, shape, getattr(torch, setup.dtype))
    return {"cases": out, "link_s": fastest, "link_median_s": median}


def _torch_cases(setup: Setup, cases, comm: Comm) -> list[dict]:
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as ts

    ref_loss, ref_grads = _reference(setup)
    classes = {"gpipe": ts.ScheduleGPipe, "1f1b": ts.Schedule1F1B, "interleaved": ts.ScheduleInterleaved1F1B,
               "zb-h1": ts.ScheduleInterleavedZeroBubble, "csv": ts._PipelineScheduleRuntime}
    out = []
    for name, m, v in cases:
        ours = name.split(":")[-1]  # "csv:1f1b": our 1F1B exported as CSV, run by PyTorch's runtime
        sched = make(ours, comm.world, m, v)
        stages = rank_stages(setup.model(), sched, comm.rank, split_backward=False)
        x, y = setup.batch()
        pipes = [PipelineStage(st, s, sched.n_stages, torch.device("cpu"), group=comm.group) for s, st in stages.items()]
        per_mb = y.numel() / m  # PyTorch averages the m micro-batch losses; each is a mean over its tokens

        def loss_fn(logits, t):
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)), t.reshape(-1), reduction="sum") / per_mb
        kind = name.split(":")[0] if ":" in name else name
        single = kind in ("gpipe", "1f1b")
        runner = classes[kind](pipes[0] if single else pipes, n_microbatches=m, loss_fn=loss_fn)
        if kind == "csv":
            path = os.path.join(tempfile.mkdtemp(), "schedule.csv")
            with open(path, "w") as f:
                f.write(sched.to_csv())
            runner._load_csv(path)
        losses = []
        runner.step(*([x] if 0 in stages else []), target=y, losses=losses)
        sync_tied_grads(stages, comm, sched.n_stages)
        order = getattr(runner, "pipeline_order", {}).get(comm.rank)
        out.append({"schedule": name, "m": m, "v": v, "rank": comm.rank, "grad_rel_diff": _grad_diff(stages, ref_grads),
                    "loss_diff": abs(sum(float(l) for l in losses) / m - ref_loss) if losses else None,
                    "order": None if order is None else [str(a) for a in order if a is not None and a.is_compute_op],
                    "ours": [str(a) for a in sched.compute(comm.rank)]})
    return out


def torch_pipelining(setup: Setup, cases, dims=None, timeout: float = 60.0) -> dict:
    """PyTorch's schedules on our stages, in a thread: {"available": False, "reason"} if no result in time."""
    comm, box = _comm(dims), {}

    def work():
        try:
            box["cases"] = _torch_cases(setup, cases, comm)
        except Exception:  # noqa: BLE001 - an error is reported as one, a hang as unavailable
            box["error"] = traceback.format_exc()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout)
    if "error" in box:
        raise RuntimeError("torch.distributed.pipelining failed:\n" + box["error"])
    if th.is_alive():
        return {"available": False, "reason": f"torch.distributed.pipelining gave no result within {timeout} s"}
    return {"available": True, "cases": box["cases"]}


def train_both(setup: Setup, name: str, m: int, v: int = 1, steps: int = 3, dims=None) -> dict:
    """`course.train.train` for a few steps with a PipelineModel, and with the unsplit model (same batches)."""
    from ..train import TrainConfig, train

    comm = _comm(dims)
    cfg = TrainConfig(max_steps=steps, batch_size=setup.batch_size, block_size=setup.seq_len, lr=1e-2,
                      warmup_steps=1, eval_interval=steps, eval_iters=1, progress=False, grad_clip=1.0)
    fixed = setup.batch(999)

    def batches():
        it = iter([setup.batch(i) for i in range(steps)])
        return lambda split: next(it) if split == "train" else fixed

    pipe = PipelineModel(setup.model(), make(name, comm.world, m, v), comm)
    hist = train(pipe, batches(), cfg)
    plain = setup.model()
    ref = train(plain, batches(), cfg)
    full = dict(plain.named_parameters())
    diff = max((q - full[st.full_name(n)]).abs().max().item() for st in pipe.stages.values()
               for n, q in st.named_parameters())
    return {"rank": comm.rank, "loss": hist.train_loss, "ref_loss": ref.train_loss, "param_diff": diff,
            "val": hist.val_loss, "ref_val": ref.val_loss, "grad_norm": hist.grad_norm, "ref_norm": ref.grad_norm}


def suite(setup: Setup, p4_cases, p2_cases, train_case, torch_cases) -> dict:
    """The tests' one launch on 4 ranks: p=4 on the world, p=2 on the two "pipeline" groups of
    Mesh(pipeline=2, data=2) (ranks {0, 2} and {1, 3}), training, then PyTorch's schedules at p=2."""
    two = {"pipeline": 2, "data": 2}
    return {"p4": check(setup, p4_cases), "p2": check(setup, p2_cases, two),
            "train": train_both(setup, *train_case, dims=two),
            "torch": torch_pipelining(setup, torch_cases, two)}


def lesson(timing: Setup, cases, naive: Setup, torch_cases, train_case, repeats: int = 1) -> dict:
    """Lesson 07's launch: the naive pipeline with real compute, the padded cases, training through the
    loop, PyTorch's schedules (last: the one part that may hang)."""
    comm = _comm()
    _one(naive, "gpipe", 1, 1, comm)  # warm-up
    real = _one(naive, "gpipe", 1, 1, comm)
    exact = replace(timing, dtype="float64")
    return {"naive": real, "timed": timed(timing, cases, repeats), "train": train_both(exact, *train_case),
            "torch": torch_pipelining(exact, torch_cases)}


def _cli(setup: Setup, cases) -> list[dict]:
    checked, measured = check(setup, cases), timed(replace(setup, dtype="float32"), cases)["cases"]
    out = []
    for c, t in zip(checked, measured):  # per rank: its own busy time within its own first-to-last action
        span = max(e for *_, e in t["spans"]) - min(s for _, _, s, _ in t["spans"])
        out.append({"schedule": c["schedule"], "m": c["m"], "v": c["v"], "rank": c["rank"],
                    "grad_rel_diff": c["grad_rel_diff"], "peak_live": c["peak_live"],
                    "busy_s": sum(e - s for _, _, s, e in t["spans"]), "rank_span_s": span})
    return out


def main(argv=None):
    """Check and time every schedule; one JSON line per rank and schedule."""
    from . import launch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="ranks to spawn when not under torchrun")
    ap.add_argument("--micro-batches", type=int, default=4)
    args = ap.parse_args(argv)
    p, m = int(os.environ.get("WORLD_SIZE", args.ranks)), args.micro_batches
    cases = [("gpipe", m, 1), ("1f1b", m, 1), ("zb-h1", m, 1)] + ([("interleaved", m, 2)] if m % p == 0 else [])
    for rows in launch.main(_cli, Setup(), cases, nproc=args.ranks):
        for row in rows:
            print(json.dumps(row))


if __name__ == "__main__":
    main()
