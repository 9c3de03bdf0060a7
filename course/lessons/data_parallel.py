"""Lesson 05 (data parallelism): timeline (Gantt), bytes per step, model-state memory."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from ..costs import model_state_bytes

COLORS = {"forward": "tab:blue", "backward": "tab:orange", "optimizer": "tab:green", "comm": "tab:red"}
LABELS = {0: "DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}


def plot_timeline(spans_by_rank: list[list[tuple]], ax=None, title: str | None = None):
    """One step per rank: a compute lane and a communication lane, milliseconds from the step start."""
    ax = ax or plt.gca()
    t0 = min(start for spans in spans_by_rank for _, _, start, _ in spans)
    for r, spans in enumerate(spans_by_rank):
        for kind, name, start, end in spans:
            lane = 2 * r + (0 if kind == "comm" else 1)
            color = COLORS["comm"] if kind == "comm" else COLORS.get(name, "gray")
            ax.broken_barh([(1e3 * (start - t0), 1e3 * (end - start))], (lane - 0.4, 0.8),
                           facecolor=color, edgecolor="black", linewidth=0.3, alpha=0.85)
    ax.set_yticks(range(2 * len(spans_by_rank)),
                  [f"rank {r} {lane}" for r in range(len(spans_by_rank)) for lane in ("all-reduce", "compute")])
    ax.set_xlabel("time since the step started (ms)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLORS.values()]
    ax.legend(handles, ["forward", "backward", "optimizer", "communication"], loc="center left",
              bbox_to_anchor=(1.01, 0.5), fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def plot_comm_bytes(measured: dict[int, dict], psi: int, ax=None, worlds=range(1, 9)):
    """Bytes each rank sends per step vs the number of ranks: formula lines, measured points."""
    ax = ax or plt.gca()
    worlds = np.array(list(worlds))
    for name, factor, style in (("DP / ZeRO-1 / ZeRO-2: 2(N-1)/N·Ψ", 2, "-"), ("ZeRO-3: 3(N-1)/N·Ψ", 3, "--")):
        ax.plot(worlds, factor * (worlds - 1) / worlds * psi * 4 / 1e6, style, color="gray", label=name)
    markers = {"naive": "o", "bucketed": "s", "zero1": "^", "zero2": "v", "zero3": "D"}
    colors = dict(zip(markers, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))
    for world, results in sorted(measured.items()):
        for name, r in results.items():
            if r["comm"] is not None and name in markers:
                ax.plot(world, r["comm"]["total_bytes"] / 1e6, markers[name], color=colors[name],
                        fillstyle="none", markersize=9,
                        label=f"measured {name}" if world == min(measured) else None)
    ax.set_xlabel("ranks N")
    ax.set_ylabel("bytes sent per rank per step (MB, fp32)")
    ax.legend(fontsize=8)
    return ax


def plot_memory(measured: dict[int, dict], ax=None):
    """Stacked bars of params / grads / optimizer state per rank, with the fp32 ZeRO formula as a tick."""
    ax = ax or plt.gca()
    names = ["naive", "zero1", "zero2", "zero3"]
    x, labels = 0, []
    for world, results in sorted(measured.items()):
        for stage, name in enumerate(names):
            mem = results[name]["memory"]
            bottom = 0
            for part, color in (("params", "tab:blue"), ("grads", "tab:orange"), ("optimizer", "tab:green")):
                ax.bar(x, mem[part] / 1e6, bottom=bottom, color=color,
                       label=part if x == 0 else None)
                bottom += mem[part] / 1e6
            formula = model_state_bytes(results[name]["psi"], "fp32", stage, world)["total"] / 1e6
            ax.plot([x - 0.45, x + 0.45], [formula] * 2, color="black", linewidth=2,
                    label="formula (P+G+K)Ψ, fp32: 4, 4, 8" if x == 0 else None)
            labels.append(f"{LABELS[stage]}\nN={world}")
            x += 1
        x += 0.5
    ax.set_xticks([i + (i // 4) * 0.5 for i in range(len(labels))], labels, fontsize=8)
    ax.set_ylabel("model state per rank (MB)")
    ax.legend(fontsize=8)
    return ax


def largest_gaps(curves: dict[int, dict]) -> dict[str, float]:
    """Largest |loss| and |parameter| difference of every run against the first (one rank)."""
    base = curves[min(curves)]
    others = [r for n, r in curves.items() if n != min(curves)]
    loss = max(abs(a - b) for r in others for a, b in zip(base["losses"], r["losses"]))
    params = max((base["state"][k] - r["state"][k]).abs().max().item() for r in others for k in base["state"])
    return {"loss": loss, "params": params}


def _backward_end(spans) -> float:
    return max(end for kind, name, start, end in spans if name == "backward")


def comm_after_backward(spans) -> bool:
    """Every communication span starts after backward's last gradient."""
    return all(start >= _backward_end(spans) for kind, _, start, _ in spans if kind == "comm")


def comm_inside_backward(spans) -> bool:
    """Several communication spans, the first one starting before backward ends (overlap)."""
    starts = [start for kind, _, start, _ in spans if kind == "comm"]
    return len(starts) > 1 and min(starts) < _backward_end(spans)


def gpt3_all_reduce_sentence(n_params: float, world: int, link_gb_s: float, bytes_per_grad: int = 2) -> str:
    """The all-reduce of a GPT-3-sized gradient per rank per step, and its time at a link bandwidth."""
    from ..costs import ring_bytes
    sent = ring_bytes("all_reduce", n_params * bytes_per_grad, world)
    return (f"All-reducing {n_params / 1e9:.1f}B 16-bit gradients over {world:,} data-parallel ranks sends "
            f"2(N−1)/N·Ψ·2 = {sent / 1e9:,.0f} GB per rank per step; at {link_gb_s:.0f} GB/s (one 400 Gb/s "
            f"InfiniBand NDR link) that is {sent / (link_gb_s * 1e9):.0f} s per step, every step. That is why "
            f"GPT-3-scale training splits the model itself across GPUs (tensor and pipeline parallelism, "
            f"chapters 06–08) and uses data parallelism only for the outermost dimension.")
