"""Figures the lessons share: attention heatmaps and loss curves, labelled and readable."""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.colors import PowerNorm
import torch


def _labels(tokens, n):
    if tokens is None:
        return None
    labels = [repr(t)[1:-1] if isinstance(t, str) else str(t) for t in tokens]
    if len(labels) != n:
        raise ValueError(f"tokens has {len(labels)} entries but the attention matrix is {n} x {n}")
    return labels


def plot_attention(weights, tokens=None, ax=None, title: str | None = None, colorbar: bool = True):
    """One attention matrix (T, T): rows are queries, columns the keys they attend to."""
    w = torch.as_tensor(weights).detach().float().cpu()
    if w.dim() != 2 or w.size(0) != w.size(1):
        raise ValueError(f"weights must be a square (T, T) matrix, got shape {tuple(w.shape)}")
    ax = ax or plt.subplots(figsize=(4.5, 4))[1]
    im = ax.imshow(w.numpy(), cmap="viridis", vmin=0.0, vmax=max(float(w.max()), 1e-9))
    labels = _labels(tokens, w.size(0))
    if labels is not None and len(labels) <= 48:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("key position (attended to)")
    ax.set_ylabel("query position")
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return ax


def attention_grid(maps, tokens=None, title: str | None = None, max_heads: int = 8, max_ticks: int = 40):
    """Every layer (rows) and head (columns) of maps (L, H, T, T), on one colour scale with a colorbar.

    With `tokens` (at most `max_ticks` of them) the first column and the last row carry the tokens as
    tick labels (queries down the side, keys along the bottom)."""
    m = torch.as_tensor(maps).detach().float().cpu()
    if m.dim() != 4:
        raise ValueError(f"maps must be (layers, heads, T, T), got shape {tuple(m.shape)}")
    L, H = m.shape[:2]
    H = min(H, max_heads)
    labels = _labels(tokens, m.size(-1))
    ticks = labels is not None and len(labels) <= max_ticks
    cell = 2.3 if ticks else 1.9
    fig, axes = plt.subplots(L, H, figsize=(cell * H + 1.2, cell * L), squeeze=False)
    # square-root colour scale: the few weights near 1 (first tokens) would otherwise hide the rest
    norm = PowerNorm(0.5, vmin=0.0, vmax=max(float(m[:, :H].max()), 1e-9))
    for l in range(L):
        for h in range(H):
            ax = axes[l][h]
            im = ax.imshow(m[l, h].numpy(), cmap="viridis", norm=norm)
            ax.set_xticks([])
            ax.set_yticks([])
            if ticks and h == 0:
                ax.set_yticks(range(len(labels)), labels, fontsize=5)
            if ticks and l == L - 1:
                ax.set_xticks(range(len(labels)), labels, fontsize=5, rotation=90)
            if l == 0:
                ax.set_title(f"head {h}", fontsize=9)
            if h == 0:
                ax.set_ylabel(f"layer {l}\nquery", fontsize=9)
            if l == L - 1:
                ax.set_xlabel("key", fontsize=9)
    if labels is not None and not ticks:
        short = "".join(labels) if all(len(x) == 1 for x in labels) else " ".join(labels)
        fig.text(0.5, 0.005, f"tokens: {short[:120]}", ha="center", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01, label="attention weight (square-root scale)")
    return fig


def plot_losses(histories: dict, ax=None, title: str | None = None):
    """Loss curves of several runs (each a course.train.History) on one axis."""
    ax = ax or plt.subplots(figsize=(7, 4))[1]
    for name, hist in histories.items():
        hist.plot(ax=ax, label=name)
    if title:
        ax.set_title(title)
    return ax
