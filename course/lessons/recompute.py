"""Lesson 04 (activation recomputation): the experiments that measure each policy.

`measure_policies` runs every policy on the same model and batch (memory with LiveTensors, step time
with interleaved rounds), `core_recompute_costs` times the ops a written-out attention core repeats.
The policies themselves live in `course.recompute`; benchmarks/checkpointing.py calls these too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..measure import measure_step, time_it
from ..progress import progress_bar
from ..recompute import apply_policy


@dataclass
class PolicyResult:
    policy: str
    activations: int  # bytes alive at the end of forward (kept for backward), measured
    peak: int  # bytes at the peak of forward + backward (weights, grads and activations), measured
    peak_activations: int  # of which activations & temporaries (not weights or gradients)
    step_time: float  # seconds, forward + backward, min over rounds
    time_ratio: float  # step_time / step_time of the first policy measured (normally "none")
    memory_ratio: float  # activations / activations of the first policy
    step: object = field(default=None, repr=False)  # the course.measure.StepMemory (timeline, breakdown)


def measure_policies(make_model, batch, policies=("none", "full", "every-k:2", "sqrt", "selective"),
                     rounds: int = 3, progress: bool = False, threads: int | None = None) -> list[PolicyResult]:
    """Memory (LiveTensors) and step time of each policy on the same model and batch.

    make_model() builds a fresh model (same seed each call). Policies are "name" or "every-k:K"; a
    "#label" suffix measures a policy again under another name: "none#control" is a second, identical
    model, and its time_ratio shows how much two runs of the same work differ on this machine.
    Timing rounds are interleaved across policies and the minimum is kept (other work on the machine
    only ever adds time), so a busy machine slows every policy alike instead of whichever ran during a
    burst. threads: torch.set_num_threads while timing (1 makes CPU ratios steadier on a shared machine).
    """
    models, mem = {}, {}
    for spec in policies:
        name, k = parse_policy(spec)
        model = apply_policy(make_model(), name, k)
        mem[spec] = measure_step(model, batch)
        models[spec] = model
    times = {spec: [] for spec in policies}
    it = progress_bar(range(rounds + 1), desc="timing rounds", enabled=progress)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for r in it:
            for spec, model in models.items():
                times[spec].append(_one_step(model, batch))
    finally:
        torch.set_num_threads(saved_threads)
    base = policies[0]
    t = {spec: min(v[1:]) for spec, v in times.items()}  # round 0 is warm-up
    return [PolicyResult(spec, mem[spec].activations, mem[spec].peak, mem[spec].at_peak["activations & temporaries"],
                         t[spec], t[spec] / t[base],
                         mem[spec].activations / mem[base].activations, mem[spec]) for spec in policies]


def parse_policy(spec: str) -> tuple[str, int | None]:
    """"every-k:2#label" -> ("every-k", 2); "sqrt" -> ("sqrt", None)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"policy spec must be a non-empty string like 'sqrt' or 'every-k:2', got {spec!r}")
    name, _, k = spec.split("#")[0].partition(":")
    if not k:
        return name, None
    if not k.isdigit():
        raise ValueError(f"policy spec {spec!r}: the part after ':' must be a positive integer k, got {k!r}")
    return name, int(k)


def _one_step(model: nn.Module, batch) -> float:
    def step():
        _, loss = model(*batch)
        loss.backward()
    dt = time_it(step, repeats=1, warmup=0, device=next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    return dt


def core_recompute_costs(batch: int, n_head: int, seq_len: int, head_size: int, dropout: float = 0.1,
                         device=None, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per call of each op that recomputing a written-out attention core repeats, on
    tensors of one block's shape (scores and probabilities are (B, nh, T, T)). Best of `repeats`.
    On CPU, dropout's mask (bernoulli_, a scalar random-number loop) costs several softmaxes; on a
    GPU it is generated inside the kernel and costs about as much as any pointwise op."""
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {dropout!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    q, k = (torch.randn(batch, n_head, seq_len, head_size, device=dev) for _ in range(2))
    scores = q @ k.transpose(-2, -1)  # (B, nh, T, T)
    probs = scores.softmax(-1)
    ops = {"QK^T (bmm)": lambda: q @ k.transpose(-2, -1),
           "softmax": lambda: scores.softmax(-1),
           "dropout (mask + scale)": lambda: torch.nn.functional.dropout(probs, dropout, True),
           "attention over V (bmm)": lambda: probs @ q}
    return {name: time_it(fn, repeats=repeats, device=dev) * 1e3 for name, fn in ops.items()}


# ----------------------------------------------------------------------------- figures

# What the backward nodes in a saved-tensor report hold, in words (autograd names them after ATen ops)
OP_LABELS = {"addmm": "linear layers' inputs (addmm)", "mm": "linear inputs without bias (mm)",
             "native_layer_norm": "LayerNorm input + mean, 1/std", "gelu": "GELU input",
             "scaled_dot_product_flash_attention_for_cpu": "fused attention q, k, v, output, LSE",
             "softmax": "softmax output", "bmm": "attention matmul inputs (bmm)",
             "native_dropout": "dropout mask", "mul": "dropout mask (mul)", "embedding": "token ids (embedding)",
             "log_softmax": "log-softmax of the logits", "nll_loss": "targets (cross-entropy)"}


def op_label(op: str) -> str:
    return OP_LABELS.get(op, op)


def plot_peak_breakdown(step, report, title: str):
    """One horizontal bar: the step's peak split into weights / gradients / optimizer state and the
    activations by the backward op that holds them (largest five), plus logits and temporaries."""
    import matplotlib.pyplot as plt
    parts = {k: v for k, v in step.at_peak.items() if k != "activations & temporaries"}
    top = {op_label(k): v for k, v in list(report.by_op().items())[:5]}
    top["other saved tensors"] = report.total - sum(top.values())
    top["logits, temporaries"] = step.at_peak["activations & temporaries"] - report.total
    fig, ax = plt.subplots(figsize=(9, 3.2))
    left = 0
    for name, nbytes in list(parts.items()) + [(f"act: {k}", v) for k, v in top.items()]:
        ax.barh(0, nbytes / 2**20, left=left, label=name)
        left += nbytes / 2**20
    ax.set_yticks([])
    ax.set_xlabel("MiB alive at the peak of one training step")
    ax.set_title(title)
    ax.legend(ncol=3, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    return fig


def plot_policies(results, plan_of, fixed_bytes: float, title: str):
    """Measured (filled) and analytic (hollow) points: peak memory against step time per policy.
    plan_of(policy spec) -> course.recompute.plan dict; fixed_bytes = what no policy changes."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, r in enumerate(results):
        theory = plan_of(r.policy)
        ax.scatter(r.time_ratio, r.peak / 2**20, s=60, c=f"C{i}", label=f"{r.policy}: measured / analytic")
        ax.scatter(1 + theory["extra compute"], (fixed_bytes + theory["activations peak"] * 2**30) / 2**20, s=60,
                   facecolors="none", edgecolors=f"C{i}")
    ax.axvline(1.0, ls=":", c="gray")
    ax.set_xlabel("step time relative to no recomputation")
    ax.set_ylabel("peak memory of the step (MiB)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_written_out(written, costs: dict, device_type: str, target=(0.40, 1.10), title: str = ""):
    """Left: activations kept against step time, with the target region (saved share, time ratio)
    shaded and the identical-model control marking the timing noise. Right: ms per op of one core."""
    import matplotlib.pyplot as plt
    none = next(r for r in written if r.policy == "none")
    control = next((r for r in written if r.policy.endswith("#control")), None)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    ax1.fill_between([1.0, target[1]], 0, (1 - target[0]) * none.activations / 2**20, color="C2", alpha=0.12,
                     label=f"the course's target (not a paper's): >= {target[0]:.0%} saved at <= {target[1]:.2f}x time")
    if control is not None:
        lo, hi = sorted((1.0, control.time_ratio))
        ax1.axvspan(2 - hi if hi > 1 else lo, hi, color="gray", alpha=0.15, label="timing noise (control)")
    for i, r in enumerate(written):
        ax1.scatter(r.time_ratio, r.activations / 2**20, s=60, c=f"C{i}", label=r.policy)
    ax1.set_xlabel("step time relative to no recomputation")
    ax1.set_ylabel("activations kept (MiB)")
    ax1.set_ylim(0, None)
    ax1.set_title(title)
    ax1.legend(fontsize=7)
    ax2.barh(list(costs), list(costs.values()), color="C7")
    ax2.set_xlabel("ms per call, one block")
    ax2.set_title(f"what recomputing the core repeats ({device_type})")
    fig.tight_layout()
    return fig


def layer_curves(C: int, H: int, seqs, batches, device=None) -> dict:
    """Measured bytes one block saves, for both attention cores, against s (b = 1) and b (s = 256)."""
    from ..measure import measured_layer_bytes
    return {core: ([measured_layer_bytes(C, H, s, 1, core, device=device) for s in seqs],
                   [measured_layer_bytes(C, H, 256, b, core, device=device) for b in batches])
            for core in ("sdpa", "matmul")}


def plot_layer_curves(curves: dict, C: int, H: int, seqs, batches):
    """Measured points and analytic lines (course.costs.layer_activation_bytes)."""
    import matplotlib.pyplot as plt
    from ..costs import layer_activation_bytes
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for core, (by_s, by_b) in curves.items():
        label, color = {"sdpa": ("fused SDPA", "C0"), "matmul": ("written-out attention", "C3")}[core]
        an_s = [sum(layer_activation_bytes(s, 1, C, H, core=core).values()) for s in seqs]
        an_b = [sum(layer_activation_bytes(256, b, C, H, core=core).values()) for b in batches]
        for ax, xs, an, got in ((axes[0], seqs, an_s, by_s), (axes[1], batches, an_b, by_b)):
            ax.plot(xs, [v / 2**20 for v in an], "-", c=color, label=f"{label}, analytic")
            ax.plot(xs, [v / 2**20 for v in got], "o", c=color, label=f"{label}, measured")
    axes[0].set_xlabel("sequence length s (tokens, batch 1)")
    axes[1].set_xlabel("batch b (sequences, s = 256)")
    for ax in axes:
        ax.set_ylabel("MiB saved by one block")
        ax.legend(fontsize=8)
    axes[0].set_xscale("log", base=2)
    axes[0].set_yscale("log", base=2)
    axes[0].set_xticks(list(seqs), [f"{s:,}" for s in seqs])
    fig.tight_layout()
    return fig


def plan_line(n_layer=24, n_embd=2048, n_head=16, seq_len=2048, batch=8, policy="none", k=2, core="sdpa") -> str:
    """One line of course.recompute.plan for the planner widget (and its static fallback)."""
    from ..recompute import plan
    p = plan(n_layer, n_embd, n_head, seq_len, batch, policy, k=k if policy == "every-k" else None, core=core)
    return (f"{p['params'] / 1e9:.2f} B params | weights {p['weights']:.1f} + grads {p['gradients']:.1f} + "
            f"AdamW {p['optimizer state']:.1f} GiB | activations kept {p['activations kept']:.1f}, peak "
            f"{p['activations peak']:.1f} GiB | total {p['total']:.1f} GiB | extra compute {p['extra compute']:.1%}")


def planner():
    """The ipywidgets planner around plan_line (errors are printed, not swallowed)."""
    import ipywidgets as w

    def show(**kw):
        try:
            print(plan_line(**kw))
        except ValueError as e:
            print(f"not possible: {e}")
    from ..recompute import POLICIES
    return w.interactive(show, n_layer=(2, 128, 2), n_embd=(256, 16384, 256), n_head=(4, 128, 4),
                         seq_len=(256, 32768, 256), batch=(1, 64), policy=list(POLICIES), k=(1, 16),
                         core=["sdpa", "matmul"])
