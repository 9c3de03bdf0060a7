"""Lesson 06 (tensor, sequence and context parallelism): the lesson's runs on gloo ranks and its figures.

The runs are top-level functions (spawned ranks import them); they call the checks of
course.parallel.tp_experiments / cp_experiments and measure one layer's communication.
"""
from __future__ import annotations

import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as dist

from ..costs import (LINKS, data_parallel_layer_bytes, korthikanti_flops, layer_activation_bytes, link_seconds,
                     ring_attention_bytes, ring_attention_saved_bytes, tensor_parallel_bytes, tensor_parallel_layer_bytes,
                     ulysses_bytes)
from ..parallel.comm import Comm
from ..parallel.context import ring_attention
from ..parallel.cp_experiments import PATTERNS, check_attention, memory_sweep, train_cp
from ..parallel.data_parallel import DataParallel
from ..parallel.experiments import Setup, build_model
from ..parallel.mesh import Mesh
from ..parallel.tensor import apply_tensor_parallel
from ..parallel.tp_experiments import check_block, check_dtensor, check_memory, check_model, shard_table
from ..parallel.ulysses import UlyssesAttention
from ..model import SDPAttention

RANK_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")

# ----------------------------------------------------------------------------- runs


def two_rank_run(setup: Setup) -> dict:
    """Shards, equality checks (ours and DTensor's), counted collectives, memory, one layer's communication."""
    return {"shards": shard_table(setup), "model": check_model(setup),
            "block": {"tensor": check_block(setup, False), "sequence": check_block(setup, True)},
            "dtensor": {"tensor": check_dtensor(setup, False), "sequence": check_dtensor(setup, True)},
            "memory": check_memory(setup, dropout=0.1), "per_layer": layer_comm(setup)}


def _timed(fn, comm, repeats):
    """(bytes, seconds in collectives, seconds in all) of fn() on this rank: the fastest of `repeats`."""
    best = None
    for _ in range(repeats):
        dist.barrier()
        comm.reset()
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
        spent = sum(e - s for kind, _, s, e in comm.spans if kind == "comm")
        if best is None or total < best[2]:
            best = (comm.total_bytes, spent, total)
    return dict(zip(("bytes", "comm_s", "step_s"), best))


def layer_comm(setup: Setup, repeats: int = 5) -> dict:
    """One Block's forward + backward on this rank in float32 under each split of the same work
    (B sequences of T tokens): what it sends and how long its communication took."""
    rank, world = dist.get_rank(), dist.get_world_size()
    B, T, C, H = setup.batch_size, setup.block_size, setup.n_embd, setup.n_head
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, C, generator=g)
    out = {}
    for sp, name in ((False, "tensor"), (True, "sequence")):
        model = apply_tensor_parallel(build_model(setup).float(), Mesh(tensor=world), sp)
        xi = x[:, rank * T // world:(rank + 1) * T // world] if sp else x
        out[name] = _timed(lambda: model.blocks[0](xi).sum().backward(), model.tp_comm, repeats)
    comm = Comm(name="data")
    block = DataParallel(build_model(setup).float().blocks[0], comm, bucket_mb=None)
    xd = x[rank * B // world:(rank + 1) * B // world]  # data parallel: this rank's sequences
    out["data"] = _timed(lambda: block(xd).sum().backward(), comm, repeats)
    q, k, v = (torch.randn(B, H, T // world, C // H, generator=g).requires_grad_() for _ in range(3))
    comm = Comm(name="context")
    out["context (ring)"] = _timed(lambda: ring_attention(q, k, v, comm, layout="zigzag").sum().backward(), comm, repeats)
    uly = UlyssesAttention(comm, SDPAttention())
    out["context (Ulysses)"] = _timed(lambda: uly(q, k, v, causal=True).sum().backward(), comm, repeats)
    return out


def four_rank_run(setup: Setup, T: int, B: int, H: int, D: int, lengths) -> dict:
    """Ring attention (both layouts) vs full attention at T tokens, its timeline and work per rank; chapter 03's
    patterns at T/2; saved and peak bytes per rank at each length; the whole model trained with zig-zag ring
    attention vs one process."""
    out = {layout: check_attention(B, H, T, D, layout=layout, causal=True) for layout in ("contiguous", "zigzag")}
    out["patterns"] = {name: check_attention(B, H, T // 2, D, layout="contiguous", pattern=name, block=T // 32)
                       for name in PATTERNS}
    out["memory"] = memory_sweep(B, H, D, lengths)
    out["train"] = train_cp(setup, "ring", "zigzag")
    return out


def layer_formulas(setup: Setup, world: int, bytes_per_el: int = 4) -> dict:
    """The formula for each measured entry of layer_comm (bytes one rank sends)."""
    b, s, h = setup.batch_size, setup.block_size, setup.n_embd
    return {"tensor": tensor_parallel_bytes(b, s, h, world, bytes_per_el=bytes_per_el)["total"],
            "sequence": tensor_parallel_bytes(b, s, h, world, bytes_per_el=bytes_per_el, sequence_parallel=True)["total"],
            "data": data_parallel_layer_bytes(h, world, bytes_per_el=bytes_per_el),
            "context (ring)": ring_attention_bytes(b, s, h, world, bytes_per_el=bytes_per_el)["total"],
            "context (Ulysses)": ulysses_bytes(b, s, h, world, bytes_per_el=bytes_per_el)["total"]}


# ----------------------------------------------------------------------------- GPT-3 on real links


def gpt3_layer_table(t: int = 8, cp: int = 8, dp: int = 64, s: int = 2048, h: int = 12288, b: int = 1,
                     batch_tokens: float = 3.2e6, gpu: str = "A100", peak: float = 312e12) -> list[dict]:
    """Bytes one GPU sends per GPT-3 layer (16-bit) and the milliseconds on NVLink vs InfiniBand, beside the
    layer's compute at the GPU's peak (Korthikanti et al. 2022's FLOPs): per micro-batch of b sequences
    split over t GPUs for the splits inside a layer; for data parallelism per optimizer step, GPT-3's batch
    of 3.2M tokens (Brown et al. 2020, Table 2.1) over dp replicas of one GPU each."""
    links = [k for k in LINKS if gpu in k]
    per_micro = korthikanti_flops(s, b, h, 1, 0) / t / peak  # seconds, at 100% of peak
    per_step = korthikanti_flops(s, batch_tokens / s / dp, h, 1, 0) / peak
    rows = [(f"tensor parallel, t={t}, per micro-batch", tensor_parallel_bytes(b, s, h, t)["total"], per_micro),
            (f"sequence parallel, t={t}, per micro-batch", tensor_parallel_bytes(b, s, h, t, sequence_parallel=True)["total"],
             per_micro),
            (f"ring attention, cp={cp}, per micro-batch", ring_attention_bytes(b, s, h, cp)["total"], per_micro),
            (f"Ulysses, cp={cp}, per micro-batch", ulysses_bytes(b, s, h, cp)["total"], per_micro),
            (f"data parallel, N={dp}, per optimizer step", data_parallel_layer_bytes(h, dp), per_step)]
    return [{"split (one layer)": what, "MB sent per GPU": n / 1e6,
             **{f"ms on {link}": link_seconds(n, link) * 1e3 for link in links}, "ms of compute at peak": sec * 1e3}
            for what, n, sec in rows]


def markdown_table(rows: list[dict], digits: int = 1) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:,.{digits}f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures


def plot_shards(shards_by_rank: list[list[dict]], n_head: int, layer: int = 0):
    """The four weight matrices of one block, each element coloured by the rank that holds it (from the
    ranks' real shard indices); dotted lines: head boundaries in q, k, v."""
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1, 4]})
    names = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    cmap = plt.matplotlib.colors.ListedColormap(RANK_COLORS[:len(shards_by_rank)])
    for ax, name in zip(axes, names):
        full = f"blocks.{layer}.{name}.weight"
        rows = [next(p for p in shards if p["name"] == full) for shards in shards_by_rank]
        t = len(rows)
        local = rows[0]["shape"]
        shape = [local[0] * t, local[1]] if rows[0]["dim"] == 0 else [local[0], local[1] * t]
        owner = np.zeros(shape)
        for r, p in enumerate(rows):
            if p["dim"] == 0:
                owner[p["indices"], :] = r
            else:
                owner[:, p["indices"]] = r
        ax.imshow(owner, cmap=cmap, vmin=-0.5, vmax=t - 0.5, aspect="auto", interpolation="nearest")
        kind = "column-parallel (output rows split)" if rows[0]["dim"] == 0 else "row-parallel (input columns split)"
        ax.set_title(f"{name} {tuple(shape)}\n{kind}\nper rank {tuple(local)}", fontsize=8)
        ax.set_xlabel("input feature")
        ax.set_ylabel("output feature")
        if name == "attn.c_attn":
            C = shape[1]
            for j in range(1, 3 * n_head):
                ax.axhline(j * C // n_head - 0.5, color="white", lw=0.6 if j % n_head else 2, ls=":" if j % n_head else "-")
            for j, label in enumerate("qkv"):
                ax.text(C + 1, (j + 0.5) * C, label, ha="left", va="center", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=RANK_COLORS[r]) for r in range(len(shards_by_rank))]
    fig.legend(handles, [f"rank {r}" for r in range(len(shards_by_rank))], loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def plot_layer_comm(measured: dict, formulas: dict, ax=None):
    """Bytes per layer (forward + backward) each split sends: measured bars, formula ticks; seconds on top."""
    ax = ax or plt.gca()
    names = list(formulas)
    x = np.arange(len(names))
    ax.bar(x, [measured[n]["bytes"] / 1e3 for n in names], color="tab:blue", label="counted by Comm")
    for i, n in enumerate(names):
        ax.plot([i - 0.4, i + 0.4], [formulas[n] / 1e3] * 2, color="black", lw=2,
                label="formula (course.costs)" if i == 0 else None)
        ax.text(i, measured[n]["bytes"] / 1e3, f"{1e3 * measured[n]['comm_s']:.1f} ms", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("bytes sent per rank per layer (kB)")
    ax.legend(fontsize=8)
    return ax


def plot_ring_timeline(spans_by_rank: list[list[tuple]], ax=None, title: str = ""):
    """Each rank's ring steps (compute lane) and hops (communication lane), forward then backward, measured."""
    ax = ax or plt.gca()
    t0 = min(s for spans in spans_by_rank for _, _, s, _ in spans)
    for r, spans in enumerate(spans_by_rank):
        for kind, name, start, end in spans:
            lane = 2 * r + (0 if kind == "comm" else 1)
            color = "tab:red" if kind == "comm" else ("tab:orange" if "backward" in name else "tab:blue")
            ax.broken_barh([(1e3 * (start - t0), 1e3 * (end - start))], (lane - 0.4, 0.8), facecolor=color,
                           edgecolor="black", linewidth=0.3, alpha=0.85)
            if kind == "compute":
                ax.text(1e3 * (start + end) / 2 - 1e3 * t0, lane, name.split()[2], ha="center", va="center", fontsize=7)
    ax.set_yticks(range(2 * len(spans_by_rank)), [f"rank {r} {lane}" for r in range(len(spans_by_rank))
                                                  for lane in ("hops", "compute")], fontsize=8)
    ax.set_xlabel("time since the attention call started (ms)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:blue", "tab:orange", "tab:red")]
    ax.legend(handles, ["forward step", "backward step", "K/V (dK/dV) hop in flight"], fontsize=7,
              loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=9)
    return ax


def plot_balance(stats_by_layout: dict[str, list[dict]], head_dim: int, ax=None):
    """Attention FLOPs per rank (12·pairs·d per head, forward + backward, counted tiles) for each layout."""
    from ..costs import attention_pair_flops
    ax = ax or plt.gca()
    width = 0.8 / len(stats_by_layout)
    for i, (layout, stats) in enumerate(stats_by_layout.items()):
        flops = [attention_pair_flops(s["pairs_computed"], head_dim) / 1e6 for s in stats]
        ax.bar(np.arange(len(stats)) + i * width, flops, width, label=layout)
    ax.set_xticks(np.arange(len(stats)) + width * (len(stats_by_layout) - 1) / 2, [f"rank {r}" for r in range(len(stats))])
    ax.set_ylabel("attention MFLOPs computed (causal)")
    ax.legend(fontsize=8)
    return ax


def plot_memory_vs_length(dense: list[dict], sweep: dict[str, list[dict]], B: int, H: int, D: int, ax=None):
    """Bytes attention keeps for backward (measured points, formula lines) and peak live bytes (hollow
    points), per rank, vs sequence length: one rank holding everything vs ring attention on N ranks."""
    ax = ax or plt.gca()
    lengths = np.array([d["T"] for d in dense])
    dense_formula = [layer_activation_bytes(int(T), B, H * D, H, core="matmul")["attention core"] for T in lengths]
    ax.plot(lengths, np.array(dense_formula) / 2**20, "-", color="tab:red", label="whole attention, 1 rank (formula)")
    ax.plot(lengths, [d["saved"] / 2**20 for d in dense], "o", color="tab:red", label="  measured saved")
    ax.plot(lengths, [d["peak"] / 2**20 for d in dense], "o", color="tab:red", fillstyle="none", label="  measured peak")
    for (layout, points), color in zip(sweep.items(), ("tab:blue", "tab:green")):
        N = points[0]["world"]
        formula = [ring_attention_saved_bytes(B, int(T), H * D, H, N) for T in lengths]
        ax.plot(lengths, np.array(formula) / 2**20, "--" if layout == "zigzag" else "-", color=color,
                label=f"ring, {layout}, per rank of {N} (formula)")
        ax.plot(lengths, [p["saved"] / 2**20 for p in points], "s", color=color, label="  measured saved")
        ax.plot(lengths, [p["peak"] / 2**20 for p in points], "s", color=color, fillstyle="none", label="  measured peak")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("attention memory per rank (MiB, fp32)")
    ax.legend(fontsize=7, ncol=2)
    return ax


SAVED_PARTS = {"LayerNorms": ("ln_1", "ln_2"), "dropout masks": ("attn.resid_dropout", "mlp.dropout"),
               "linears and attention": ("attn.c_attn", "attn.core", "attn.c_proj", "mlp.c_fc", "mlp.gelu",
                                         "mlp.c_proj")}


def plot_saved_by_part(mem: dict, s: int, b: int, h: int, n_head: int, t: int, ax=None):
    """Stacked bars of what block 0 saves for backward (measured, by module group) for one process, tensor
    parallel and + sequence parallel, each with its formula (tensor_parallel_layer_bytes) as a black line."""
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    for i, label in enumerate(("whole", "tensor", "sequence")):
        bottom = 0
        for j, (part, modules) in enumerate(SAVED_PARTS.items()):
            v = sum(mem[label]["by_module"].get(f"blocks.0.{m}", 0) for m in modules) / 1e3
            ax.bar(i, v, bottom=bottom, color=f"C{j}", label=part if i == 0 else None)
            bottom += v
        formula = sum(tensor_parallel_layer_bytes(s, b, h, n_head, 1 if label == "whole" else t, bytes_per_el=4,
                                                  sequence_parallel=label == "sequence", dropout=True).values())
        ax.plot([i - 0.4, i + 0.4], [formula / 1e3] * 2, color="black", lw=2, label="formula" if i == 0 else None)
    ax.set_xticks(range(3), ["one process", f"tensor parallel\n(per rank, t={t})", f"+ sequence parallel\n(per rank, t={t})"])
    ax.set_ylabel("bytes one block saves for backward (kB)")
    ax.legend(fontsize=8)
    return ax

