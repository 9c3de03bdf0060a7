"""Lesson 08, section 1b: the 3D-parallel run on 8 CPU ranks and its rank grid.

`run_lesson()` starts `course.parallel.threed.suite` on 8 spawned ranks (the same function the tests
and `python -m course.parallel.threed` run); `draw_grid` draws the mesh as nodes x GPUs, once per
parallel dimension, each group in its own colour; `summary_rows` turns the per-rank results into one
row per case for the lesson's table and asserts.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Patch, Rectangle

from ..parallel import launch
from ..parallel.threed import ORDER
from ..parallel.threed_experiments import Setup, suite

CASES = ((2, 2, 2, "none", False), (2, 2, 2, "full", True))  # (dp, pp, tp, recompute, ZeRO-1)
TITLES = {"tensor": "tensor groups (all-reduce in every layer)", "data": "data groups (gradient all-reduce)",
          "pipeline": "pipeline groups (activations stage to stage)"}


def run_lesson(setup: Setup | None = None, cases=CASES, gpus_per_node: int = 4, timeout: float = 600) -> list:
    """values[rank][case]: every case on 8 spawned gloo ranks, "nodes" of gpus_per_node ranks."""
    return launch.run(suite, 8, setup or Setup(), list(cases), gpus_per_node, timeout=timeout, threads=1).values


def draw_grid(result: dict, gpus_per_node: int = 4):
    """Three panels (tensor, data, pipeline): ranks as cells of a nodes x GPUs grid, coloured by group."""
    groups, world = result["groups"], sum(len(g) for g in result["groups"]["tensor"])
    nodes = world // gpus_per_node
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.3), constrained_layout=True)
    cmap = plt.get_cmap("tab10")
    for ax, dim in zip(axes, ("tensor", "data", "pipeline")):
        colour = {r: cmap(i) for i, g in enumerate(groups[dim]) for r in g}
        for r in range(world):
            node, gpu = divmod(r, gpus_per_node)
            ax.add_patch(Rectangle((gpu, nodes - 1 - node), 0.92, 0.88, color=colour[r], alpha=0.75))
            ax.text(gpu + 0.46, nodes - 1 - node + 0.44, f"rank {r}\n{_coords(groups, r)}", ha="center",
                    va="center", fontsize=7)
        ax.set_xlim(0, gpus_per_node)
        ax.set_ylim(0, nodes)
        ax.set_xticks([g + 0.46 for g in range(gpus_per_node)], [f"GPU {g}" for g in range(gpus_per_node)])
        ax.set_yticks([nodes - 1 - n + 0.44 for n in range(nodes)], [f"node {n}" for n in range(nodes)])
        ax.set_xlabel("local rank (GPU within the node)")
        ax.set_title(TITLES[dim], fontsize=9)
        ax.legend(handles=[Patch(color=cmap(i), alpha=0.75, label="ranks " + ", ".join(map(str, g)))
                           for i, g in enumerate(groups[dim])], ncol=2, fontsize=7, frameon=False,
                  loc="upper center", bbox_to_anchor=(0.5, -0.32))
        for s in ax.spines.values():
            s.set_visible(False)
    fig.suptitle("Mesh(pipeline=2, data=2, tensor=2), 4 ranks per node; cell text: (pipeline, data, tensor) "
                 "coordinates; one colour per group", fontsize=9)
    return fig


def _coords(groups: dict, rank: int) -> str:
    return "(" + ", ".join(str(next(g.index(rank) for g in groups[d] if rank in g)) for d in ORDER) + ")"


def summary_rows(values: list, cases=CASES) -> list[dict]:
    """One row per case: the largest differences from one process over all ranks, norms, optimizer state."""
    rows = []
    for i, (dp, pp, tp, recompute, zero1) in enumerate(cases):
        rs = [v[i] for v in values]
        rows.append({"layout": f"dp={dp} x pp={pp} x tp={tp}", "recompute": recompute, "zero1": zero1,
                     "param_diff": max(r["param_diff"] for r in rs),
                     "loss_diff": max(abs(a - b) for r in rs for a, b in zip(r["loss"], r["ref_loss"])),
                     "norm_rel_diff": max(abs(a - b) / b for r in rs for a, b in zip(r["grad_norm"], r["ref_norm"])),
                     "ref_norm": rs[0]["ref_norm"], "every_copy_norm": rs[0]["every_copy_norm"],
                     "opt_state": sum(r["opt_state"] for r in rs), "params_held": sum(r["params_here"] for r in rs),
                     "optimizer": rs[0]["optimizer"], "policies": sorted({p for r in rs for p in r["recompute"]})})
    return rows
