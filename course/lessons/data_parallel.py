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
