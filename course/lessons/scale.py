"""Lesson 08 (GPT-3 at scale): the planner's figures, tables and widget.

Every number comes from `course.scale.plan` (closed forms from `course.costs`, each with its source);
published results come from `course.scale_presets`. The 3D run and its calibration join after chapters
06 and 07 (tensor/context and pipeline parallelism) are merged.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .. import scale
from .. import scale_calibration as cal
from ..scale_presets import GB, GPUS, MEGATRON_TABLE1, MEGATRON_TABLE2_175B, MEGATRON_TABLE2_ZERO3_175B, NODES

PARTS = ("params", "grads", "optimizer", "activations", "buffers")  # buffers: ZeRO-3's gathered layers
PART_COLORS = dict(zip(PARTS, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:gray")))
TIME_PARTS = ("compute", "bubble", "tensor", "context", "pipeline", "data")
TIME_COLORS = dict(zip(TIME_PARTS, ("tab:blue", "lightgray", "tab:red", "tab:brown", "tab:purple", "tab:green")))
STORY_ORDER = ("pipeline", "tensor", "context", "data")  # data innermost (inside a node), model across


def gpt3_memory_layouts(batch: int = 1536) -> dict:
    """GPT-3 175B on 1,024 GPUs: from pure data parallelism to the standard 3D layout and its add-ons."""
    L = scale.Layout
    return {
        "DP 1024": L(dp=1024, n_micro=batch // 1024 or 1, micro_batch=1, recompute="none"),
        "TP 8 x DP 128": L(dp=128, tp=8, n_micro=batch // 128, recompute="none"),
        "TP 8 x PP 16 x DP 8": L(dp=8, tp=8, pp=16, n_micro=batch // 8, recompute="none"),
        "+ ZeRO-1": L(dp=8, tp=8, pp=16, n_micro=batch // 8, zero=1, recompute="none"),
        "+ seq. parallel, selective": L(dp=8, tp=8, pp=16, n_micro=batch // 8, zero=1, sp=True, recompute="selective"),
        "+ full recompute": L(dp=8, tp=8, pp=16, n_micro=batch // 8, zero=1, sp=True, recompute="full"),
        "ZeRO-3, DP 1024, full": L(dp=1024, n_micro=1, micro_batch=1, zero=3, recompute="full"),
    }


def plot_memory(plans: dict, ax=None, ylim_gb: float = 200):
    """Stacked bars of bytes per GPU (GB) by part, the GPU's memory as a line; taller bars are clipped
    and labelled with their total."""
    ax = ax or plt.gca()
    labels = list(plans)
    bottom = np.zeros(len(labels))
    for part in PARTS:
        vals = np.array([plans[k].memory[part] / GB for k in labels])
        ax.bar(labels, vals, bottom=bottom, color=PART_COLORS[part], label=part)
        bottom += vals
    for i, k in enumerate(labels):
        total = plans[k].memory["total"] / GB
        ax.text(i, min(total, ylim_gb * 0.97), f"{total:,.0f} GB", ha="center", va="bottom" if total < ylim_gb else "top",
                fontsize=8, color="black" if total < ylim_gb else "white", fontweight="bold")
    for gpu, style in (("A100", "--"), ("V100", ":")):
        ax.axhline(GPUS[gpu].memory / GB, color="black", linestyle=style, linewidth=1,
                   label=f"{gpu} memory ({GPUS[gpu].memory / GB:.0f} GB)")
    ax.set_ylim(0, ylim_gb)
    ax.set_ylabel(f"memory per GPU (GB), fullest stage; cut at {ylim_gb:g}")
    ax.tick_params(axis="x", labelrotation=30)
    for t in ax.get_xticklabels():
        t.set_horizontalalignment("right")
    ax.legend(fontsize=8, loc="upper right")
    return ax


def plot_step_time(plans: dict, ax=None, title: str = ""):
    """Stacked bars of one iteration's seconds: compute, bubble and the exposed communication per dimension."""
    ax = ax or plt.gca()
    labels = list(plans)
    bottom = np.zeros(len(labels))
    for part in TIME_PARTS:
        vals = np.array([plans[k].times[part] for k in labels])
        if vals.any():
            ax.bar(labels, vals, bottom=bottom, color=TIME_COLORS[part], label=part if part in ("compute", "bubble")
                   else f"{part} communication")
        bottom += vals
    ax.set_ylabel("seconds per iteration")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return ax


def tensor_degree_plans(model, cl, batch: int = 1536, pp: int = 16, efficiency: float = 0.5) -> dict:
    """The same pipeline depth with tensor parallelism 1 ... 32: beyond a node (8), its all-reduces cross
    InfiniBand. Layouts that do not fit are kept (the figure shows their time, the table their memory)."""
    out = {}
    for tp in (1, 2, 4, 8, 16, 32):
        dp = cl.world // (tp * pp)
        lay = scale.Layout(dp=dp, tp=tp, pp=pp, n_micro=batch // dp, zero=1, sp=tp > 1, recompute="full")
        out[f"TP {tp}"] = scale.plan(model, cl, lay, efficiency=efficiency, tensor_within_node=False)
    return out


def story_vs_standard(model, cl, batch: int = 1536, efficiency: float = 0.5, tokens: float = 300e9) -> dict:
    """The source story's placement (data parallel inside each node, model parallel between nodes) against
    the standard one (tensor inside a node, pipeline across, data outermost), with the same degrees."""
    dp, tp = 8, 8
    pp = cl.world // (dp * tp)
    base = dict(dp=dp, tp=tp, pp=pp, n_micro=batch // dp, zero=1, sp=True, recompute="full")
    plans = {"standard (TP in node)": scale.plan(model, cl, scale.Layout(**base), efficiency=efficiency),
             "story (DP in node)": scale.plan(model, cl, scale.Layout(**base, order=STORY_ORDER),
                                              efficiency=efficiency, tensor_within_node=False)}
    rows = {k: {"layout": f"dp {dp} x tp {tp} x pp {pp}", "inside a node": [d for d, ln in q.links.items()
                                                                            if ln == "intra" and q.layout.sizes()[d] > 1],
                "GB over InfiniBand per GPU per iteration": q.slow_bytes / GB, "step (s)": q.step,
                "MFU": q.mfu, "days for 300B tokens": q.days(tokens)} for k, q in plans.items()}
    return {"plans": plans, "rows": rows}


def format_rows(rows: dict) -> str:
    """A plain-text table of {label: {column: value}} (floats with 3 significant digits)."""
    cols = list(next(iter(rows.values())))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ", ".join(v) if isinstance(v, list) else str(v)
    table = [["", *cols]] + [[k, *(fmt(r[c]) for c in cols)] for k, r in rows.items()]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols) + 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)


def scaling_curves(model, node: str, batch: int, base: scale.Layout, factors=(1, 2, 4, 8, 16),
                   efficiency: float = 0.5) -> dict:
    """Grow one parallel dimension of `base` at a time (global batch fixed: strong scaling) and plan each
    valid layout: {dimension: [(GPUs, Plan)]}. Tensor groups may cross nodes here, to show what it costs."""
    g = NODES[node][1]
    key = {"data": "dp", "pipeline": "pp", "tensor": "tp"}
    out = {}
    for dim, attr in key.items():
        pts = []
        for f in factors:
            sizes = {"dp": base.dp, "tp": base.tp, "pp": base.pp, attr: getattr(base, attr) * f}
            world = sizes["dp"] * sizes["tp"] * sizes["pp"]
            if world % g or batch % (sizes["dp"] * base.micro_batch):
                continue
            lay = scale.Layout(**sizes, micro_batch=base.micro_batch, n_micro=batch // (sizes["dp"] * base.micro_batch),
                               zero=base.zero, recompute=base.recompute, sp=base.sp)
            try:
                q = scale.plan(model, scale.cluster(node, world // g), lay, efficiency=efficiency,
                               tensor_within_node=False)
            except ValueError:
                continue
            pts.append((world, q))
        out[dim] = pts
    return out


def plot_scaling(curves: dict, ax=None, title: str = ""):
    """TFLOP/s per GPU against the GPU count, one line per dimension grown; hollow markers do not fit."""
    ax = ax or plt.gca()
    ticks, any_bad = set(), False
    for (dim, pts), marker in zip(curves.items(), "osD"):
        xs = [n for n, _ in pts]
        ticks.update(xs)
        ax.plot(xs, [q.tflops_per_gpu for _, q in pts], "-", marker=marker, label=f"grow {dim}", alpha=0.85)
        bad = [(n, q.tflops_per_gpu) for n, q in pts if not q.fits]
        if bad:
            any_bad = True
            ax.plot(*zip(*bad), marker, markersize=11, fillstyle="none", color="black")
    if any_bad:
        ax.plot([], [], "o", fillstyle="none", color="black", label="does not fit in memory")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(ticks), [f"{n:,}" for n in sorted(ticks)])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("planned TFLOP/s per GPU (counting recomputation)")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return ax


def megatron_table1_predictions() -> dict:
    """Planned vs published TFLOP/s per GPU for every row of Narayanan et al.'s Table 1, the efficiency
    fitted on CALIBRATION_ROW alone."""
    eff = cal.megatron_efficiency()
    rows = []
    for i, row in enumerate(MEGATRON_TABLE1):
        q = scale.plan(*cal.megatron_case(row), efficiency=eff, **cal.MEGATRON_OPTIONS)
        rows.append({"params (B)": row[0], "published": row[8], "planned": q.tflops_per_gpu,
                     "error": q.tflops_per_gpu / row[8] - 1, "calibration": i == cal.CALIBRATION_ROW})
    return {"efficiency": eff, "rows": rows}


def plot_calibration(pred: dict, ax=None):
    ax = ax or plt.gca()
    rows = pred["rows"]
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["published"] for r in rows], 0.4, label="published (Table 1)", color="tab:gray")
    ax.bar(x + 0.2, [r["planned"] for r in rows], 0.4, label="planned", color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(i + 0.2, r["planned"] + 2, "fit" if r["calibration"] else f"{r['error']:+.0%}", ha="center", fontsize=7)
    ax.set_xticks(x, [f"{r['params (B)']:g}B" for r in rows], rotation=45)
    ax.set_xlabel("model (Narayanan et al. 2021, Table 1)")
    ax.set_ylabel("TFLOP/s per A100")
    ax.set_ylim(0, 200)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def strong_scaling_175b(gpus=(96, 192, 384, 768, 1536, 3072), batch: int = 1536) -> dict:
    """GPT-3's 174.6B layout (t = 8, p = 12, micro-batch 1) at a fixed batch on more and more GPUs, and
    ZeRO-3 without model parallelism (micro-batch 4/2/1), both planned with the Table-1 calibration, next to
    Narayanan et al.'s Table 2. ZeRO-3 is planned twice: its gathers perfectly hidden, and not at all."""
    eff = cal.megatron_efficiency()
    spec = scale.GPTSpec("174.6B", 96, 12288, 96, vocab=51200)
    ptdp = []
    for n in gpus:
        d = n // 96
        q = scale.plan(spec, scale.cluster("dgx-a100", n // 8), scale.Layout(dp=d, tp=8, pp=12, n_micro=batch // d),
                       efficiency=eff, **cal.MEGATRON_OPTIONS)
        ptdp.append((n, q))
    zero3 = {}
    for overlap in (1.0, 0.0):
        zero3[overlap] = [(n, scale.plan(spec, scale.cluster("dgx-a100", n // 8),
                                         scale.Layout(dp=n, micro_batch=b, n_micro=batch // (n * b), zero=3),
                                         efficiency=eff, overlap_dp=overlap)) for n, b, _, _ in MEGATRON_TABLE2_ZERO3_175B]
    return {"efficiency": eff, "ptdp": ptdp, "zero3": zero3}


def plot_strong_scaling(res: dict, ax=None):
    ax = ax or plt.gca()
    ax.plot([n for n, _ in res["ptdp"]], [q.tflops_per_gpu for _, q in res["ptdp"]], "-o", color="tab:blue",
            label="PTD-P (t 8, p 12), planned")
    ax.plot([r[0] for r in MEGATRON_TABLE2_175B], [r[1] for r in MEGATRON_TABLE2_175B], "s", color="tab:blue",
            markersize=10, fillstyle="none", label="PTD-P, published (Table 2)")
    lo, hi = ([q.tflops_per_gpu for _, q in res["zero3"][o]] for o in (0.0, 1.0))
    ns = [n for n, _ in res["zero3"][1.0]]
    ax.fill_between(ns, lo, hi, color="tab:orange", alpha=0.3, label="ZeRO-3, planned (gathers hidden ... exposed)")
    ax.plot([r[0] for r in MEGATRON_TABLE2_ZERO3_175B], [r[2] for r in MEGATRON_TABLE2_ZERO3_175B], "D",
            color="tab:orange", markersize=9, fillstyle="none", label="ZeRO-3, published (Table 2)")
    ax.set_xscale("log", base=2)
    ns = [n for n, _ in res["ptdp"]]
    ax.set_xticks(ns, [f"{n:,}" for n in ns])
    ax.set_xlabel("A100 GPUs (global batch 1,536 sequences)")
    ax.set_ylabel("TFLOP/s per GPU")
    ax.set_ylim(0, 200)
    ax.legend(fontsize=8, loc="lower left")
    return ax


def describe(model: str = "175B", node: str = "dgx-a100", nodes: int = 128, tp: int = 8, pp: int = 16, v: int = 1,
             micro_batch: int = 1, batch: int = 1536, zero: int = 1, recompute: str = "full", sp: bool = True,
             efficiency: float = 0.5, tokens: float = 300e9) -> str:
    """One planned layout as text, for the widget and its static fallback. dp follows from the rest."""
    cl = scale.cluster(node, nodes)
    if cl.world % (tp * pp):
        raise ValueError(f"tp x pp = {tp * pp} must divide the {cl.world} GPUs")
    dp = cl.world // (tp * pp)
    if batch % (dp * micro_batch):
        raise ValueError(f"batch={batch} must be a multiple of dp x micro_batch = {dp} x {micro_batch}")
    lay = scale.Layout(dp=dp, tp=tp, pp=pp, v=v, micro_batch=micro_batch, n_micro=batch // (dp * micro_batch),
                       zero=zero, recompute=recompute, sp=sp, schedule="interleaved" if v > 1 else "1f1b")
    q = scale.plan(scale.gpt3(model), cl, lay, efficiency=efficiency)
    m = q.memory
    mem = " + ".join(f"{k} {m[k] / GB:.1f}" for k in PARTS if k != "buffers" or m[k])
    times = ", ".join(f"{k} {v:.2f}" for k, v in q.times.items() if v)
    fit = "fits" if q.fits else f"does NOT fit ({m['total'] / GB - cl.gpu.memory / GB:.1f} GB over)"
    return (f"GPT-3 {model} on {cl.world} {cl.gpu.name} ({nodes} x {node}): dp {dp} x tp {tp} x pp {pp}, "
            f"{lay.n_micro} micro-batches of {micro_batch}\n"
            f"memory per GPU: {mem} = {m['total'] / GB:.1f} GB of {cl.gpu.memory / GB:.0f}: {fit}\n"
            f"iteration {q.step:.2f} s ({times}); {q.tflops_per_gpu:.0f} TFLOP/s per GPU, MFU {q.mfu:.1%}, "
            f"{q.days(tokens):.1f} days for {tokens / 1e9:.0f}B tokens at {efficiency:.0%} of peak compute")


def planner(efficiency: float = 0.5):
    """The ipywidgets planner around `describe` (errors are printed, not swallowed)."""
    import ipywidgets as w

    def show(**kw):
        try:
            print(describe(efficiency=efficiency, **kw))
        except ValueError as e:
            print(f"not possible: {e}")
    from ..scale_presets import GPT3_TABLE
    d = describe.__defaults__  # the widget starts on describe's defaults: the standard 175B layout
    start = dict(zip(describe.__code__.co_varnames[:len(d)], d))

    def pick(name, options):
        return w.Dropdown(options=options, value=start[name], description=name)
    return w.interactive(show, model=pick("model", list(GPT3_TABLE)), node=pick("node", list(NODES)),
                         nodes=w.IntSlider(start["nodes"], 1, 1024), tp=pick("tp", [1, 2, 4, 8, 16]),
                         pp=pick("pp", [1, 2, 4, 8, 12, 16, 24, 32, 48, 96]), v=pick("v", [1, 2, 3, 4]),
                         micro_batch=pick("micro_batch", [1, 2, 4, 8]), batch=w.IntText(start["batch"]),
                         zero=pick("zero", [0, 1, 2, 3]), recompute=pick("recompute", list(scale.RECOMPUTE)),
                         sp=start["sp"])
