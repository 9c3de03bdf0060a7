"""Pipeline bubbles measured on gloo ranks vs the simulator and the formulas; peak activation memory.

Equal stages on a CPU: every stage holds the same number of identical blocks, and every action is
padded to a fixed time (`course.parallel.pp_experiments.action_seconds`: layer_seconds per layer for
F, I and W, twice that for B) by sleeping after its real compute (a tiny model, far shorter). Ranks
that sleep do not compete for the cores, so 2 or 4 ranks (one thread each) on 2 cores measure the
schedule, not the CPU's contention; the few actions whose compute ran past the pad are counted.
What the pads cannot absorb is a fixed cost between actions (the Python loop, posting a send, waking a
rank blocked in a receive: about a millisecond on a quiet machine, far more when other processes keep
the cores busy), so the default pad is 40 ms per layer; the 1-minute load average is recorded.
The simulator gets the same action times and the measured one-way link time of one activation (the
median of 21 round trips: it includes waking a blocked rank, most of a message's cost on a busy CPU).

Bubble = idle share of the step, 1 - busy / (p · makespan) (GPipe's (p-1)/(m+p-1) for GPipe and
1F1B); Megatron's bubble/ideal = makespan/busy - 1 is reported beside it. Of `repeats` runs of a
case, the one with the shortest step is kept. Targets:
- GPipe and 1F1B at p in {2, 4}, m in {1, 2, 4, 8}: measured within ±10% (relative) of the
  simulator and of (p-1)/(m+p-1);
- interleaved 1F1B with v = 2 cuts 1F1B's measured bubble by >= 1.6x (m = 8);
- ZB-H1's measured bubble <= 0.5x 1F1B's (m = 8; the paper's regime m >= p);
- 1F1B's measured peak activation bytes at m = 8 <= p/m of GPipe's + 10% (on the rank where the ratio
  is largest: rank 0, p against m micro-batches).

    python benchmarks/pipeline.py            # 2 and 4 gloo ranks
    python benchmarks/pipeline.py --gpu      # same (gloo on the CPU: one GPU cannot host 2 NCCL ranks)
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course.costs import gpipe_bubble_fraction, megatron_bubble_ratio  # noqa: E402
from course.device import machine_info  # noqa: E402
from course.parallel import launch  # noqa: E402
from course.parallel.pipeline import timeline  # noqa: E402
from course.parallel.pp_experiments import Setup, action_seconds, timed  # noqa: E402
from course.parallel.schedules import make, simulate  # noqa: E402

MS = (1, 2, 4, 8)


def cases_for(p: int):
    out = [(name, m, 1) for name in ("gpipe", "1f1b", "zb-h1") for m in MS]
    return out + [("interleaved", m, 2) for m in MS if m % p == 0]


def measure(setup: Setup, p: int, repeats: int) -> dict:
    cases = cases_for(p)
    values = launch.run(timed, p, setup, cases, repeats, timeout=900, threads=1).values
    link, fastest = values[0]["link_median_s"], values[0]["link_s"]
    out = {}
    for i, (name, m, v) in enumerate(cases):
        rows = [vals["cases"][i] for vals in values]
        tl = timeline([r["spans"] for r in rows], p)
        sched = make(name, p, m, v)
        sim = simulate(sched, action_seconds(setup, sched), link=link)
        out[f"{name} p={p} m={m} v={v}"] = {
            "schedule": name, "p": p, "m": m, "v": v, "makespan_s": tl.makespan, "bubble": tl.bubble,
            "bubble_ratio": tl.bubble_ratio, "simulated_bubble": sim.bubble, "simulated_makespan_s": sim.makespan,
            "gpipe_formula": gpipe_bubble_fraction(p, m), "megatron_formula": megatron_bubble_ratio(p, m, v),
            "peak_live": [r["peak_live"] for r in rows], "peak_bytes": [r["peak_bytes"] for r in rows],
            "overruns": sum(r["overruns"] for r in rows), "link_median_s": link, "link_fastest_s": fastest}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="accepted for run_gpu.sh; the ranks are gloo CPU ranks")
    ap.add_argument("--repeats", type=int, default=None, help="runs per case (default 3; 2 with --gpu)")
    ap.add_argument("--layer-ms", type=float, default=None,
                    help="padded forward time per layer (default 40 ms; 30 with --gpu, to fit run_gpu.sh's 150 s)")
    args = ap.parse_args(argv)
    args.repeats = args.repeats or (2 if args.gpu else 3)
    args.layer_ms = args.layer_ms or (30.0 if args.gpu else 40.0)
    setup = Setup(dtype="float32", layer_seconds=args.layer_ms / 1e3)
    res = {}
    for p in (2, 4):
        res.update(measure(setup, p, args.repeats))

    targets = {}
    for key, r in res.items():
        if r["schedule"] in ("gpipe", "1f1b"):
            for base, name in (("simulated_bubble", "simulator"), ("gpipe_formula", "formula")):
                ratio = r["bubble"] / r[base]
                targets[f"{key}: bubble vs {name}"] = {"target": "within +-10%", "measured": r["bubble"],
                                                       "baseline": r[base], "ratio": ratio,
                                                       "met": abs(ratio - 1) <= 0.10}
    for p in (2, 4):
        one, gp = res[f"1f1b p={p} m=8 v=1"], res[f"gpipe p={p} m=8 v=1"]
        inter, zb = res[f"interleaved p={p} m=8 v=2"], res[f"zb-h1 p={p} m=8 v=1"]
        targets[f"p={p} m=8: interleaved v=2 cuts 1F1B's bubble"] = {
            "target": ">= 1.6x", "measured": inter["bubble"], "baseline": one["bubble"],
            "ratio": one["bubble"] / inter["bubble"], "met": one["bubble"] / inter["bubble"] >= 1.6,
            "ratio_megatron_normalization": one["bubble_ratio"] / inter["bubble_ratio"]}
        targets[f"p={p} m=8: ZB-H1 bubble vs 1F1B's"] = {
            "target": "<= 0.5x", "measured": zb["bubble"], "baseline": one["bubble"],
            "ratio": zb["bubble"] / one["bubble"], "met": zb["bubble"] / one["bubble"] <= 0.5}
        worst = max(range(p), key=lambda r: one["peak_bytes"][r] / gp["peak_bytes"][r])  # rank 0: p vs m
        mem, base = one["peak_bytes"][worst], gp["peak_bytes"][worst]
        targets[f"p={p} m=8: 1F1B peak activation bytes vs GPipe's (rank {worst}, the largest ratio)"] = {
            "target": f"<= p/m + 10% = {1.1 * p / 8:.3f}", "measured": mem, "baseline": base,
            "ratio": mem / base, "met": mem / base <= 1.1 * p / 8}
    out = {"machine": machine_info(),
           "config": {"ranks": [2, 4], "threads_per_rank": 1, "backend": "gloo", "n_layer": setup.n_layer,
                      "n_embd": setup.n_embd, "seq_len": setup.seq_len, "batch": setup.batch_size,
                      "layer_seconds": setup.layer_seconds, "B_over_F": 2, "I_W_over_F": 1, "repeats": args.repeats,
                      "statistic": "shortest step of the repeats", "load_average_1min": os.getloadavg()[0],
                      "note": "gloo CPU ranks with padded action times, also under --gpu"},
           "measured": res, "targets": targets, "met": all(t["met"] for t in targets.values())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
