"""Small CPU runs that calibrate the step-time simulator and test its predictions (lesson 08, section 6b).

    res = launch.run(measure, 2, Runs(), timeout=300).values[0]
    course.scale_calibration.calibrate_cpu(res)    # fit on res["links"] and res["compute"],
                                                    # predict res["layouts"] (never fitted on them)
    python -m course.parallel.calibration_runs [--3d]   # the same from a shell; --3d: 2 x 2 x 2 on 8 ranks

One launch of 2 ranks measures, with the same threads per process throughout:
- links: gloo all-reduces and one-way sends (ping-pong / 2) of several sizes, and "sync": a small
  all-reduce right after compute, whose extra time is the simulator's cost per blocking call;
- compute: the whole model trained by `course.train.train` on every rank at once, independently (no
  communication), at several batch sizes and numbers of micro-batches: the step time against the step's
  FLOPs and forward-backward passes, with the cores as contended as in the parallel runs;
- layouts: the same model and recipe as data parallel (bucketed, course.parallelize), tensor parallel
  (course.parallelize) and 1F1B pipeline parallel (course.parallel.pipeline.PipelineModel), 2 ranks each;
  with three_d, on 8 ranks, course.parallel.threed's data x pipeline x tensor = 2 x 2 x 2 instead.
Every time is the mean of its repeats (a step: the slowest rank's time, every step after the first,
which pays one-time costs, over all rounds). The mean because the simulator adds parts up: a step is
a sum of compute spans and of 16-27 collectives or sends, and the expected sum is the sum of the
expected parts (linearity), whatever their spread; the fastest of a sum is not the sum of the fastest
parts. On a quiet 2-core AMD EPYC, with the fastest repeats the predictions fell 17-45 % short; with
means (and scale_calibration.calibrate_cpu's per-call wait, vocabulary collectives and no hidden
gradient reduce) they came within -21 % to +3 % on 2 ranks and -14 % to -6 % for 3D on 8.
`Runs(statistic="min")` brings it back.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..parallelize import Plan, parallelize
from ..train import train
from .comm import Comm
from .experiments import Setup, batch_fn, build_model
from .mesh import Mesh
from .pipeline import PipelineModel
from .schedules import make


@dataclass
class Runs:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    vocab_size: int = 64
    block_size: int = 64
    batch_size: int = 8  # global batch of every layout
    steps: int = 4  # per measured run (the first is dropped)
    rounds: int = 3
    compute_runs: tuple = ((2, 1), (4, 1), (8, 1), (8, 4))  # whole-model (batch, micro-batches) runs fitted on
    pp_micro_batches: int = 4
    dp_buckets: int = 4
    link_sizes: tuple = (2 ** 10, 2 ** 14, 2 ** 17, 2 ** 19, 2 ** 21)  # bytes
    repeats: int = 15
    statistic: str = "mean"  # of the repeats, for every time: "mean", "median" or "min" (docstring)
    sync_gap: float = 0.003  # seconds of matmuls before each "sync" sample (about one layer's forward here)
    sync_repeats: int = 200  # its mean is of waits that vary from 0 to milliseconds: many repeats

    def __post_init__(self):
        if self.statistic not in STATISTICS:
            raise ValueError(f"Runs.statistic must be one of {sorted(STATISTICS)}, got {self.statistic!r}")

    def setup(self, batch: int | None = None, micro_batches: int = 1) -> Setup:
        return Setup(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, vocab_size=self.vocab_size,
                     block_size=self.block_size, batch_size=batch or self.batch_size, steps=self.steps,
                     micro_batches=micro_batches,
                     dtype="float32", grad_clip=None, bucket_mb=self.param_bytes() / self.dp_buckets / 1e6 * 1.01)

    def param_bytes(self) -> float:
        h, l, V, s = self.n_embd, self.n_layer, self.vocab_size, self.block_size
        return 4.0 * (l * (12 * h * h + 13 * h) + (V + s) * h + 2 * h)


def _step_seconds(model, setup: Setup, rank: int = 0, world: int = 1, comm=None) -> list[float]:
    """This rank's step times after the first; the ranks start every step together (a barrier after
    each, outside the timed part), so step k of all ranks ran at the same time. rank, world: this rank's
    data-parallel slice of the batch; comm: the loop's (data-parallel) Comm where the model needs one."""
    cfg = replace(setup.train_config(), eval_interval=10 ** 9)
    hist = train(model, batch_fn(setup, rank, world), cfg, comm=comm,
                 hooks=[lambda e, s: e == "after_step" and dist.barrier()])
    local = setup.batch_size // world * setup.block_size  # the tokens train() counts on this rank per step
    return [local / tps for tps in hist.tokens_per_s[1:]]


STATISTICS = {"mean": torch.mean, "median": torch.median, "min": torch.min}


def summary(times, statistic: str = "mean") -> float:
    """One time from repeats: their mean (default), median or fastest."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    if len(times) == 0:
        raise ValueError("summary: no times to summarise")
    return STATISTICS[statistic](torch.tensor(list(times), dtype=torch.float64)).item()


def _sample(op: str, nbytes: int, world: int, trips: list, statistic: str, raw: dict | None) -> tuple:
    """(op, bytes, world, seconds) from this rank's repeats, as rank 0 saw them (the same on every rank)."""
    times = torch.tensor(trips, dtype=torch.float64)
    dist.broadcast(times, 0)
    if raw is not None:
        raw[(op, nbytes)] = times.tolist()
    return op, nbytes, world, summary(times.tolist(), statistic)


def links(r: Runs, comm: Comm, raw: dict | None = None) -> list[tuple]:
    """(op, bytes, world, seconds) samples on `comm`'s group of 2 (every such group at once, as in the
    runs): all-reduce, and one-way send (half a round trip); each the r.statistic of `repeats`, rank 0's
    view. raw: filled with every repeat, {(op, bytes): [seconds, ...]}."""
    out = []
    for n in r.link_sizes:
        x = torch.zeros(n // 4, dtype=torch.float32)
        for op in ("all_reduce", "send"):
            trips = []
            for _ in range(r.repeats):
                dist.barrier()
                t = time.perf_counter()
                if op == "all_reduce":
                    comm.all_reduce(x)
                elif comm.rank == 0:
                    comm.send(x, 1)
                    comm.recv(x, 1)
                else:
                    comm.recv(x, 0)
                    comm.send(x, 0)
                trips.append((time.perf_counter() - t) / (1 if op == "all_reduce" else 2))
            out.append(_sample(op, n, comm.world, trips, r.statistic, raw))
    # "sync": a 1 KB all-reduce right after each rank computed for sync_gap seconds, as a collective
    # comes in training. Beyond a back-to-back one it pays the wait for the partner that finishes its
    # compute later and the wake-up of a process that was busy: the simulator's call_overhead.
    x, a, trips = torch.zeros(256), torch.randn(128, 128), []
    for _ in range(r.sync_repeats):
        dist.barrier()
        end = time.perf_counter() + r.sync_gap
        while time.perf_counter() < end:
            a @ a
        t = time.perf_counter()
        comm.all_reduce(x)
        trips.append(time.perf_counter() - t)
    out.append(_sample("sync", 1024, comm.world, trips, r.statistic, raw))
    return out


def measure(r: Runs, three_d: bool = False) -> dict:
    """Everything the calibration needs, on every rank (rank 0's values are the ones used): on 2 ranks
    the DP, TP and PP layouts; three_d=True on 8 ranks the 2 x 2 x 2 layout of course.parallel.threed
    (Plan(pipeline=...)), with the links measured on its tensor pairs, all four at once.
    The runs alternate in `rounds` rounds, so a machine whose load changes slows all of them alike; each
    value is the r.statistic of the steps (over all rounds) of the slowest rank: the same statistic for
    the runs the fit uses and the runs it predicts. out["raw"] keeps every repeat."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != (8 if three_d else 2):
        raise ValueError(f"measure runs on {8 if three_d else 2} ranks (three_d={three_d}), got {world}")
    s = r.setup()
    jobs = {("compute", b, k): (build_model(r.setup(b, k)), r.setup(b, k), 0, 1) for b, k in r.compute_runs}
    if three_d:
        from .threed import make_mesh
        mesh = make_mesh(2, 2, 2, gpus_per_node=4)
        pair = mesh.comm("tensor")
        plan = Plan(tensor_parallel=True, pipeline="1f1b", micro_batches=r.pp_micro_batches // 2)
        jobs["3D 2x2x2"] = (parallelize(build_model(s), plan, mesh=mesh), s, mesh.coords(rank)["data"], 2)
    else:
        pair = Comm()
        jobs["DP 2"] = (parallelize(build_model(s), s.plan("bucketed"), comm=Comm()), s, rank, world)
        jobs["TP 2"] = (parallelize(build_model(s), Plan(tensor_parallel=True), mesh=Mesh(tensor=world)), s, 0, 1)
        jobs["PP 2"] = (PipelineModel(build_model(s), make("1f1b", world, r.pp_micro_batches),
                                      Mesh(pipeline=world).comm("pipeline")), s, 0, 1)
    raw = {"links": {}, "steps": {}}
    out = {"runs": r, "links": links(r, pair, raw["links"]), "compute": [], "layouts": {}, "raw": raw,
           "world": world, "cores": os.cpu_count()}
    seen = {k: [] for k in jobs}
    for _ in range(r.rounds):
        for key, (model, setup, rk, w) in jobs.items():
            dist.barrier()
            comm = getattr(model, "dp", None)
            t = torch.tensor(_step_seconds(model, setup, rk, w, comm), dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
            seen[key] += t.tolist()
    raw["steps"] = seen
    for key, times in seen.items():
        if isinstance(key, tuple):
            out["compute"].append((key[1], key[2], summary(times, r.statistic)))
        else:
            out["layouts"][key] = summary(times, r.statistic)
    return out


def main(argv=None):
    """Measure, fit and predict; print one JSON line: the fit and (measured s, predicted s, error) per layout."""
    import argparse
    import json

    from .. import scale_calibration
    from . import launch
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--3d", dest="three_d", action="store_true", help="the 2 x 2 x 2 layout on 8 ranks")
    ap.add_argument("--rounds", type=int, default=Runs.rounds)
    args = ap.parse_args(argv)
    res = launch.run(measure, 8 if args.three_d else 2, Runs(rounds=args.rounds), args.three_d, timeout=900).values[0]
    out = scale_calibration.calibrate_cpu(res)
    print(json.dumps({"fit": out["fit"], "layouts": out["layouts"]}))


if __name__ == "__main__":
    main()
