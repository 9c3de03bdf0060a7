"""Lesson 11 (FlashAttention): the tiling picture, the online-softmax trace and the measurements.

The kernel lives in `course.flash`; this module draws it and measures it for the lesson and for
benchmarks/flash_attention.py: time against SDPA's kernel, bytes saved for backward against T.
"""
from __future__ import annotations

import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..costs import flash_layer_bytes, layer_activation_bytes
from ..flash import FlashAttention, computed_tiles, flash_attention
from ..measure import saved_tensors
from ..model import MatmulAttention, ModelConfig, Transformer, set_attention
from ..progress import progress_bar


def online_softmax_trace(scores: torch.Tensor, block: int) -> tuple[list[dict], torch.Tensor]:
    """softmax of one row of scores, one tile of `block` keys at a time (FlashAttention's recurrence).

    Returns ([{tile, tile_max, m, l}] after each tile, probabilities). The probabilities are exp(s - m) / l
    with the final running max m and sum l: equal to torch.softmax(scores)."""
    m, l, trace = -math.inf, 0.0, []
    for t, j0 in enumerate(range(0, scores.numel(), block)):
        tile = scores[j0:j0 + block]
        m_new = max(m, tile.max().item())
        l = l * math.exp(m - m_new) + torch.exp(tile - m_new).sum().item()  # rescale the old sum, add the tile
        m = m_new
        trace.append({"tile": t, "tile_max": tile.max().item(), "m": m, "l": l})
    return trace, torch.exp(scores - m) / l


def draw_tiling(T: int = 20, block_q: int = 4, block_k: int = 4, row_tile: int = 3, layout=None, causal: bool = True):
    """Left: the T x T score matrix in tiles (computed / skipped), one query tile's sweep over its key tiles.
    Right: the running max and sum of one query row of that tile after each key tile (random scores)."""
    tiles = computed_tiles(T, block_q, block_k, causal, layout)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    for (i, j), done in np.ndenumerate(tiles.numpy()):
        colour = ("C1" if i == row_tile else "C0") if done else "0.92"
        a.add_patch(plt.Rectangle((j * block_k, i * block_q), min(block_k, T - j * block_k), min(block_q, T - i * block_q),
                                  facecolor=colour, edgecolor="white", lw=2, alpha=0.85 if done else 1))
    y = row_tile * block_q + min(block_q, T - row_tile * block_q) / 2
    last = int(tiles[row_tile].nonzero().max()) * block_k + block_k / 2
    a.annotate("", xy=(last, y), xytext=(block_k / 2, y), arrowprops=dict(arrowstyle="->", lw=2))
    a.text(T + 0.5, y, "query tile i:\nrunning m, l, O\nover key tiles j", va="center", fontsize=8)
    a.set_xlim(0, T); a.set_ylim(T, 0); a.set_aspect("equal")
    a.set_xlabel("key position j"); a.set_ylabel("query position i")
    a.set_title(f"T = {T}, tiles {block_q} x {block_k}: blue/orange computed, grey skipped", fontsize=9)
    g = torch.Generator().manual_seed(0)
    row = torch.randn(T, generator=g, dtype=torch.float64) * 2  # one query's scores
    n = int(tiles[row_tile].sum())
    trace, _ = online_softmax_trace(row[: n * block_k], block_k)
    steps = [t["tile"] for t in trace]
    b.plot(steps, [t["tile_max"] for t in trace], "o:", c="0.5", label="max of this tile")
    b.plot(steps, [t["m"] for t in trace], "o-", c="C1", label="running max m")
    b2 = b.twinx()
    b2.plot(steps, [t["l"] for t in trace], "s--", c="C2", label="running sum l = sum exp(s - m)")
    b.set_xlabel("key tile j (in the order the kernel visits them)"); b.set_ylabel("score")
    b2.set_ylabel("l (rescaled by exp(m_old - m_new) when m grows)")
    b.set_xticks(steps)
    b.legend(loc="upper left", fontsize=8); b2.legend(loc="lower right", fontsize=8)
    b.set_title("online softmax for one query row", fontsize=9)
    fig.tight_layout()
    return fig


def layer_bytes_vs_T(seq_lens, n_embd: int, n_head: int, batch: int = 1, dropout: float = 0.1, device=None) -> dict:
    """Bytes one Block saves for backward (course.measure.saved_tensors, forward only), flash core vs the
    written-out core, with the formulas beside them: {"T", "flash", "written", "flash formula", "written formula"}."""
    out = {k: [] for k in ("T", "flash", "written", "flash formula", "written formula")}
    for T in seq_lens:
        for name, core in (("flash", lambda i: FlashAttention(128, 128)), ("written", lambda i: MatmulAttention())):
            torch.manual_seed(0)
            m = Transformer(ModelConfig.gpt(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=T, vocab_size=64,
                                            dropout=dropout)).to(device)
            set_attention(m, core)
            idx = torch.zeros(batch, T, dtype=torch.long, device=device)
            report, _ = saved_tensors(m, lambda: m(idx)[0].sum())
            out[name].append(report.under("blocks.0"))
        kind = "cuda" if torch.device(device or "cpu").type == "cuda" else "cpu"
        out["T"].append(T)
        out["flash formula"].append(sum(flash_layer_bytes(T, batch, n_embd, n_head, dropout=dropout > 0,
                                                          device=kind).values()))
        out["written formula"].append(sum(layer_activation_bytes(T, batch, n_embd, n_head, core="matmul",
                                                                 dropout=dropout > 0, device=kind).values()))
    return out


def auto_block(T: int) -> int:
    """Tile size for one attention call of length T: 256 (few tiles: little Python overhead per tile) unless
    that leaves fewer than 8 tiles per row, where the half-empty diagonal tiles of causal attention waste
    too much (T // 8, at least 64). Chosen by timing 64 ... 512 on a 2-core CPU at T = 1024 ... 4096."""
    return max(64, min(256, T // 8))


def kernel_times(seq_lens, batch: int = 1, n_head: int = 8, head_dim: int = 64, causal: bool = True,
                 dropout: float = 0.0, block: int | None = None, rounds: int = 2, device=None,
                 progress: bool = False, threads: int | None = None) -> dict:
    """Forward + backward seconds of the flash kernel (tiles `block` x `block`, default `auto_block(T)`) and of
    SDPA, the min over `rounds` interleaved runs, and the bytes each saves for backward (saved_tensors, counted
    in the first run). SDPA with dropout on CPU is its math fallback. Also the bytes SDPA saves when given the
    causal mask as a tensor. threads: torch.set_num_threads while timing (1: steadier on a shared CPU).
    -> {T: {"block", "flash_s", "sdpa_s", "ratio", "flash_saved", "sdpa_saved", "sdpa_mask_saved"}}."""
    dev = torch.device(device or "cpu")
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _kernel_times(seq_lens, batch, n_head, head_dim, causal, dropout, block, rounds, dev, progress)
    finally:
        torch.set_num_threads(saved_threads)


def _kernel_times(seq_lens, batch, n_head, head_dim, causal, dropout, block, rounds, dev, progress):
    out = {}
    for T in progress_bar(seq_lens, desc="kernel timings", enabled=progress):
        g = torch.Generator(device=dev).manual_seed(T)
        q, k, v = (torch.randn(batch, n_head, T, head_dim, device=dev, generator=g, requires_grad=True) for _ in range(3))
        bs = block or auto_block(T)
        fns = {"flash": lambda: flash_attention(q, k, v, causal, block_q=bs, block_k=bs, dropout_p=dropout, seed=1),
               "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)}
        best, saved = {n: math.inf for n in fns}, {}
        for r in range(rounds):
            for name, fn in fns.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                if r == 0:  # also count what the forward saves (the hooks see 5 or 6 tensors: no cost to speak of)
                    report, o = saved_tensors(nn.Module(), fn)
                    saved[name] = report.total
                else:
                    o = fn()
                o.sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
                q.grad = k.grad = v.grad = None
                del o
        mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        report, o = saved_tensors(nn.Module(), lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        del o
        out[T] = {"block": bs, "flash_s": best["flash"], "sdpa_s": best["sdpa"], "ratio": best["flash"] / best["sdpa"],
                  "flash_saved": saved["flash"], "sdpa_saved": saved["sdpa"], "sdpa_mask_saved": report.total}
    return out


def plot_scaling(times: dict, layer: dict):
    """Left: forward + backward seconds against T (log-log). Right: bytes one block saves against T."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    Ts = list(times)
    a.plot(Ts, [times[T]["sdpa_s"] for T in Ts], "o-", label="SDPA (PyTorch's fused CPU kernel)")
    a.plot(Ts, [times[T]["flash_s"] for T in Ts], "s-", label="course.flash (plain PyTorch tiles)")
    a.set_xscale("log", base=2); a.set_yscale("log")
    a.set_xlabel("sequence length T"); a.set_ylabel("forward + backward, seconds")
    a.set_title("one attention call, causal, fp32", fontsize=9); a.legend(fontsize=8)
    for name, c in (("flash", "C1"), ("written", "C3")):
        label = {"flash": "flash core", "written": "written-out core (MatmulAttention)"}[name]
        b.plot(layer["T"], [x / 2**20 for x in layer[f"{name} formula"]], "-", c=c, label=f"{label}, formula")
        b.plot(layer["T"], [x / 2**20 for x in layer[name]], "o", c=c, label=f"{label}, measured")
    b.set_xscale("log", base=2); b.set_yscale("log", base=2)
    b.set_xlabel("sequence length T"); b.set_ylabel("MiB one block saves for backward")
    b.set_title("activations per layer: O(T) vs O(T²)", fontsize=9); b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_policies(results, title: str, target_saving: float = 0.40, target_time: float = 1.10):
    """Lesson 04's axes: activations kept against step time relative to no recomputation, one point per policy."""
    base = results[0].activations
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between([1.0, target_time], 0, (1 - target_saving) * base / 2**20, color="C2", alpha=0.12,
                    label=f"course's target: >= {target_saving:.0%} saved at <= {target_time:.2f}x time")
    for i, r in enumerate(results):
        ax.scatter(r.time_ratio, r.activations / 2**20, s=90 if r.policy == "flash" else 50, c=f"C{i}",
                   marker="*" if r.policy == "flash" else "o", label=r.policy)
    ax.axvline(1.0, ls=":", c="gray", label="no recomputation (1.00x)")
    ax.set_xlabel("step time relative to no recomputation"); ax.set_ylabel("activations kept, MiB")
    ax.set_ylim(0, None); ax.set_title(title, fontsize=9); ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
