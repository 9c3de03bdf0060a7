"""Lesson 08, section 6b (simulating one iteration): the Gantt of a simulated iteration, the simulator
against the planner, and the calibration on our own CPU runs (measured vs predicted step time).

Every timeline comes from `course.simulate.simulate`; the calibration runs `course.parallel.calibration_runs`
on 2 ranks and fits/predicts with `course.scale_calibration.calibrate_cpu`.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from .. import scale, simulate
from .. import scale_calibration as cal
from ..scale_presets import GB

KIND_COLORS = {"F": "tab:blue", "B": "tab:orange", "tensor": "tab:red", "context": "tab:brown",
               "send": "tab:purple", "reduce": "tab:green", "gather": "olive", "optimizer": "black"}
KIND_NAMES = {"F": "forward", "B": "backward (+ recomputed forward)", "tensor": "tensor all-reduces",
              "context": "ring attention", "send": "pipeline send in flight", "reduce": "gradient reduce (bucket)",
              "gather": "parameter all-gather", "optimizer": "optimizer step"}
LANE = {"compute": (0.0, 0.5), "data": (0.3, 0.18), "pipeline": (-0.3, 0.12)}  # stream -> (offset, height)
STORY_ORDER = ("pipeline", "tensor", "context", "data")  # data parallel inside a node, model parallel across


def gpt3_layouts(batch: int = 1536) -> dict:
    """The standard 8 x 8 x 16 layout of GPT-3 175B on 1,024 GPUs and the story's placement of the same degrees."""
    base = dict(dp=8, tp=8, pp=16, n_micro=batch // 8, zero=1, sp=True, recompute="full")
    return {"standard (TP in node)": scale.Layout(**base), "story (DP in node)": scale.Layout(**base, order=STORY_ORDER)}


def plan_and_simulate(model, cl, layouts: dict, efficiency: float, tokens: float = 300e9) -> dict:
    """{label: {"plan", "sim", row}}: the closed form and the simulator on the same inputs."""
    out = {}
    for label, lay in layouts.items():
        within = scale.dimension_links(cl, lay)["tensor"] == "intra"
        p = scale.plan(model, cl, lay, efficiency=efficiency, tensor_within_node=within)
        sim = simulate.simulate(model, cl, lay, efficiency=efficiency, tensor_within_node=within)
        days = tokens / (lay.batch * model.seq_len / sim.step) / 86400
        out[label] = {"plan": p, "sim": sim, "row": {
            "GB over InfiniBand per GPU per iteration": p.slow_bytes / GB, "planned step (s)": p.step,
            "simulated step (s)": sim.step, "simulated days for 300B tokens": days}}
    return out


def plot_gantt(sim: simulate.Simulation, ranks=None, ax=None, window=None, title: str = ""):
    """One lane per pipeline rank (labelled with the global rank it stands for): compute in the middle,
    the data-parallel link above it, pipeline messages in flight below. window: (t0, t1) seconds."""
    ax = ax or plt.gca()
    ranks = list(range(sim.layout.pp)) if ranks is None else list(ranks)
    t0, t1 = window or (0.0, sim.step)
    for y, r in enumerate(ranks):
        by = {}
        for s in sim.spans:
            if s.rank == r and s.end > t0 and s.start < t1:
                by.setdefault((s.stream, s.kind), []).append((s.start, s.end - s.start))
        for (stream, kind), bars in by.items():
            off, hgt = LANE[stream]
            ax.broken_barh(bars, (y + off - hgt / 2, hgt), facecolor=KIND_COLORS[kind], edgecolor="none")
    kinds = sorted({s.kind for s in sim.spans}, key=list(KIND_COLORS).index)
    ax.legend(handles=[Patch(color=KIND_COLORS[k], label=KIND_NAMES[k]) for k in kinds], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_yticks(range(len(ranks)), [f"stage {r} (rank {sim.global_ranks[r]})" for r in ranks])
    ax.set_ylim(len(ranks) - 0.4, -0.6)
    ax.set_xlim(t0, t1)
    ax.set_xlabel("time in the iteration (s)")
    ax.set_title(title)
    return ax


def cpu_calibration(runs=None, timeout: float = 300.0, three_d: bool = False) -> dict:
    """Measure on 2 CPU ranks (three_d: 8, the 2 x 2 x 2 layout) with course.parallel.calibration_runs,
    fit, predict: calibrate_cpu's result plus the raw measurement under "measured"."""
    from ..parallel import launch
    from ..parallel.calibration_runs import Runs, measure
    res = launch.run(measure, 8 if three_d else 2, runs or Runs(), three_d, timeout=timeout).values[0]
    return {**cal.calibrate_cpu(res), "measured": res}


def plot_cpu_calibration(out: dict, axes=None):
    """Left: the α–β fits against the link samples. Right: measured vs predicted step per layout, errors."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    for op, key, color in (("all_reduce", "collective", "tab:red"), ("send", "p2p", "tab:purple")):
        pts = [(n, t) for o, n, _, t in out["measured"]["links"] if o == op]
        n = np.array([p[0] for p in pts], dtype=float)
        a, b = out["fit"][key]
        steps = 2 if op == "all_reduce" else 1  # 2 ranks: 2(N-1) ring steps and 2(N-1)/N·n bytes = n
        ax.loglog(n, [p[1] * 1e3 for p in pts], "o", color=color, label=f"{op} measured (fastest of repeats)")
        ax.loglog(n, (steps * a + n / b) * 1e3, "-", color=color, label=f"fit α = {a * 1e6:.0f} µs, β = {b / GB:.2f} GB/s")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("time (ms)")
    ax.set_title("gloo on this machine, 2 ranks")
    ax.legend(fontsize=7)
    ax = axes[1]
    names = list(out["layouts"])
    meas = [out["layouts"][k][0] * 1e3 for k in names]
    pred = [out["layouts"][k][1] * 1e3 for k in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, meas, 0.4, label="measured", color="tab:gray")
    ax.bar(x + 0.2, pred, 0.4, label="simulated (fitted on compute + links only)", color="tab:blue")
    for i, k in enumerate(names):
        ax.text(x[i] + 0.2, pred[i], f"{out['layouts'][k][2]:+.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.35 * max(meas + pred))
    ax.set_ylabel("step time (ms)")
    ax.set_title("prediction vs measurement (error on the bar)")
    ax.legend(fontsize=7, loc="upper left")
    return axes
