"""Lesson 07 (pipeline parallelism): Gantt charts of measured and simulated timelines, the explorer,
bubble and memory plots, and the lesson's launch.

The same `plot_gantt` draws a `course.parallel.schedules.Timeline` from `simulate` (time in units of
one layer's forward) and one measured by `course.parallel.pipeline.run_schedule` (milliseconds).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from ..costs import gpipe_bubble_fraction, megatron_bubble_ratio, pipeline_hop_elements, ring_bytes, zb_h1_bubble_time
from ..parallel import launch
from ..parallel.pipeline import timeline
from ..parallel.schedules import SCHEDULES, make, simulate

COLORS = {"F": "tab:blue", "B": "tab:orange", "I": "tab:red", "W": "tab:green"}
NAMES = {"F": "forward", "B": "backward", "I": "backward: input gradient", "W": "backward: weight gradient"}
TITLES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved 1F1B", "zb-h1": "ZB-H1"}


def unit_costs(v: int = 1, layers_per_rank: int = 1) -> dict:
    """Per-action costs of one chunk in units of one layer's forward: B = 2F, I = W = F (Qi et al. 2023)."""
    per = layers_per_rank / v
    return {"F": per, "B": 2 * per, "I": per, "W": per}


def formula_ratio(name: str, p: int, m: int, v: int = 1) -> float | None:
    """Bubble over ideal time (idle / busy per rank) that the schedule's paper gives, at unit_costs(v):
    (p-1)/m for GPipe and 1F1B, (p-1)/(vm) interleaved (Narayanan et al. 2021, section 2.2); ZB-H1's idle
    time (p-1)(F+I-W) over its busy time m(F+I+W) (Qi et al. 2023, section 2.1), None when m < p, where the
    deferred W passes are too few to fill the cool-down and the formula does not hold."""
    if name == "zb-h1":
        if m < p:
            return None
        c = unit_costs()
        return zb_h1_bubble_time(p, c["F"], c["I"], c["W"]) / (m * (c["F"] + c["I"] + c["W"]))
    return megatron_bubble_ratio(p, m, v if name == "interleaved" else 1)


def plot_gantt(tl, ax=None, title: str | None = None, scale: float = 1.0, unit: str = "time", v: int = 1):
    """One lane per rank (rank 0 on top); a box per compute action, labelled with its micro-batch;
    hatched boxes are a rank's second (or later) model chunk. scale multiplies the times (1e3: ms)."""
    ax = ax or plt.gca()
    t0 = min(s for ev in tl.events for _, s, _ in ev)
    for r, ev in enumerate(tl.events):
        for a, start, end in ev:
            x, w = scale * (start - t0), scale * (end - start)
            ax.broken_barh([(x, w)], (r - 0.4, 0.8), facecolor=COLORS[a.kind], edgecolor="black", linewidth=0.4,
                           hatch="//" if a.stage // tl.p else None, alpha=0.9)
            if w > 0.02 * scale * tl.makespan:
                ax.text(x + w / 2, r, str(a.mb), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(tl.p), [f"rank {r}" for r in range(tl.p)])
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title or "", fontsize=9)
    return ax


def legend(fig, kinds=("F", "B", "I", "W"), chunks: bool = True):
    handles = [Patch(color=COLORS[k], label=NAMES[k]) for k in kinds]
    if chunks:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="second model chunk (v=2)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def caption(tl, name: str, p: int, m: int, v: int = 1) -> str:
    """Title with the timeline's idle share and bubble ratio beside the formula for this schedule."""
    if name == "interleaved":
        formula = f"(p-1)/(vm) = {megatron_bubble_ratio(p, m, v):.2f}"
    elif name == "zb-h1":
        formula = "(p-1)(F+I-W)/m(F+I+W)"
    else:
        formula = f"(p-1)/m = {megatron_bubble_ratio(p, m):.2f}"
    return (f"{TITLES[name]}: idle share {tl.bubble:.1%}, bubble/ideal {tl.bubble_ratio:.2f}\n"
            f"formula {formula}")


def explore(p: int = 4, m: int = 8, v: int = 2, schedule: str = "interleaved", link: float = 0.0) -> dict:
    """The explorer's logic (a plain function: ipywidgets swallows exceptions). Simulated timeline of a
    schedule with B = 2F and I = W = F per layer, its bubble and peak live activations per rank."""
    sched = make(schedule, p, m, v if schedule == "interleaved" else 1)
    tl = simulate(sched, unit_costs(sched.v), link=link)
    per_mb = [n / sched.v for n in tl.peak_live]  # chunks of 1/v of a stage -> micro-batches' worth
    return {"schedule": sched, "timeline": tl, "bubble": tl.bubble, "ratio": tl.bubble_ratio,
            "gpipe_formula": gpipe_bubble_fraction(p, m), "megatron_formula": megatron_bubble_ratio(p, m, sched.v),
            "peak_microbatches": per_mb}


def draw_explore(result: dict, fig=None):
    """Gantt chart and peak memory of one `explore` result."""
    fig = fig or plt.figure(figsize=(10, 3.2))
    gs = fig.add_gridspec(1, 4)
    ax, mem = fig.add_subplot(gs[0, :3]), fig.add_subplot(gs[0, 3])
    s = result["schedule"]
    plot_gantt(result["timeline"], ax, caption(result["timeline"], s.name, s.p, s.m, s.v),
               unit="time (forward passes of one stage)")
    mem.barh(range(s.p), result["peak_microbatches"], color="tab:purple")
    mem.set_yticks(range(s.p), [f"rank {r}" for r in range(s.p)])
    mem.invert_yaxis()
    mem.set_xlabel("peak live activations\n(micro-batches of one stage)")
    fig.tight_layout()
    return fig


def explorer():
    """ipywidgets controls over `explore`; draws with `draw_explore`."""
    import ipywidgets as w

    def show(p, m, v, schedule):
        try:
            draw_explore(explore(p, m, v, schedule))
            plt.show()
        except ValueError as e:  # e.g. interleaving with m not a multiple of p: say so in the widget
            print(f"ValueError: {e}")
    return w.interactive(show, p=w.IntSlider(4, 2, 8), m=w.IntSlider(8, 1, 32), v=w.IntSlider(2, 1, 4),
                         schedule=w.Dropdown(options=SCHEDULES, value="interleaved"))


def run_lesson(timing, cases, naive, torch_cases, train_case, p: int = 4, repeats: int = 2,
               timeout: float = 600.0) -> dict:
    """The lesson's one launch on p ranks (one thread each): the naive pipeline with real compute, every
    case with padded action times (the shortest of `repeats` runs), training through course.train.train,
    PyTorch's schedules."""
    from ..parallel.pp_experiments import lesson

    values = launch.run(lesson, p, timing, cases, naive, torch_cases, train_case, repeats, timeout=timeout,
                        threads=1).values
    out = {"naive": timeline([v["naive"]["spans"] for v in values], p), "link_s": values[0]["timed"]["link_s"],
           "torch": [v["torch"] for v in values], "train": [v["train"] for v in values], "cases": {}}
    for i, (name, m, v) in enumerate(cases):
        rows = [vals["timed"]["cases"][i] for vals in values]
        out["cases"][(name, m, v)] = {"timeline": timeline([r["spans"] for r in rows], p),
                                      "peak_live": [r["peak_live"] for r in rows],
                                      "peak_bytes": [r["peak_bytes"] for r in rows],
                                      "sent_bytes": [r["sent_bytes"] for r in rows],
                                      "overruns": sum(r["overruns"] for r in rows)}
    return out


SCHEDULE_COLORS = {"gpipe": "tab:blue", "1f1b": "tab:orange", "interleaved": "tab:purple", "zb-h1": "tab:green"}


def simulate_cases(timing, cases, link: float, p: int = 4) -> dict:
    """Each case simulated with the executor's padded action times (`action_seconds`) and the measured link."""
    from ..parallel.pp_experiments import action_seconds

    out = {}
    for name, m, v in cases:
        sched = make(name, p, m, v)
        out[(name, m, v)] = simulate(sched, action_seconds(timing, sched), link=link)
    return out


def replay(measured, schedule, link: float):
    """The simulator given the measured duration of every action (and the measured link): the earliest
    each action could have started. Never later than measured, since every measured start already
    follows its rank's previous action and its message (tested); the difference is time lost between
    actions (Python, scheduling, waking up)."""
    took = {a: e - s for ev in measured.events for a, s, e in ev}
    return simulate(schedule, lambda a: took[a], link=link)


def plot_bubbles(measured: dict, simulated: dict, p: int, ax=None):
    """Idle share vs micro-batches: GPipe's formula (line), measured (circles), simulated (crosses)."""
    ax = ax or plt.gca()
    grid = range(1, max(m for _, m, _ in measured) + 1)
    ax.plot(grid, [gpipe_bubble_fraction(p, m) for m in grid], "k-", lw=1, label="(p-1)/(m+p-1): GPipe, 1F1B")
    for name, color in SCHEDULE_COLORS.items():
        keys = sorted(k for k in measured if k[0] == name)
        if keys:
            ax.plot([k[1] for k in keys], [measured[k]["timeline"].bubble for k in keys], "o-", fillstyle="none",
                    color=color, ms=8, lw=0.8, label=f"{TITLES[name]}" + (f" v={keys[0][2]}" if keys[0][2] > 1 else ""))
            ax.plot([k[1] for k in keys], [simulated[k].bubble for k in keys], "x", color=color, ms=7)
    ax.plot([], [], "ko", fillstyle="none", label="measured")
    ax.plot([], [], "kx", label="simulated")
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("idle share: 1 - busy / (p · makespan)")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    return ax


def plot_memory(measured: dict, ax=None):
    """Measured peak bytes that autograd keeps per rank, one group of bars per schedule."""
    ax = ax or plt.gca()
    keys = list(measured)
    p = len(measured[keys[0]]["peak_bytes"])
    width = 0.8 / p
    for r in range(p):
        ax.bar([i + r * width for i in range(len(keys))], [measured[k]["peak_bytes"][r] / 2**10 for k in keys],
               width, label=f"rank {r}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))],
                  [f"{TITLES[n]}\nm={m}" + (f", v={v}" if v > 1 else "") for n, m, v in keys], fontsize=8)
    ax.set_ylabel("peak activation memory (KiB), measured")
    ax.legend(fontsize=8)
    return ax


def comm_per_step(b: int, s: int, h: int, n_layer: int, ranks: int, m: int, bytes_per_el: int = 2) -> dict:
    """Bytes one rank sends per step when a model of n_layer layers is split over `ranks` ranks:
    - as a pipeline (p = ranks): b·s·h per micro-batch to the next stage and as many back to the previous
      (Narayanan et al. 2021, section 3.2);
    - with tensor parallelism (t = ranks): every layer all-reduces b·s·h twice in the forward and twice in
      the backward pass (Shoeybi et al. 2019, section 3), ring all-reduce bytes from course.costs.ring_bytes."""
    hop = pipeline_hop_elements(b, s, h) * bytes_per_el
    return {"hop_bytes": hop, "pipeline_bytes": 2 * hop * m,
            "tensor_bytes": 4 * ring_bytes("all_reduce", hop, ranks) * n_layer * m}
