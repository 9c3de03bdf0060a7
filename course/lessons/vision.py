"""Lesson 10 (ViT, CLIP): figures of scenes, patches, positions, windows, attention and similarity, and the
zero-shot report. Every figure draws what the library computed; nothing here trains or decides."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from ..vision import clip as C
from ..vision import data as D


def show_scenes(scenes, n: int = 6):
    """Top row: the images with their captions; bottom row: every object's whole mask in its own shade
    (nested objects outlined in white: a click there could mean the inner shape or the whole)."""
    n = min(n, len(scenes))
    fig, axes = plt.subplots(2, n, figsize=(2.1 * n, 4.6), squeeze=False)
    for i, s in enumerate(scenes[:n]):
        axes[0][i].imshow(s.image.permute(1, 2, 0).numpy())
        axes[0][i].set_title("\n".join(_wrap(s.caption, 22)), fontsize=7)
        label = torch.zeros(s.image.shape[1:])
        for k in range(len(s.shapes)):  # parents first, so inner objects overwrite their parent's label
            label[s.masks[k]] = k + 1
        axes[1][i].imshow(label.numpy(), cmap="tab10", vmin=0, vmax=10, interpolation="nearest")
        for k in (s.parent >= 0).nonzero()[:, 0].tolist():
            axes[1][i].contour(s.masks[k].numpy(), levels=[0.5], colors="white", linewidths=1.2)
        axes[1][i].set_title(f"{len(s.shapes)} objects, {int((s.parent >= 0).sum())} nested", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][0].set_ylabel("image", fontsize=9)
    axes[1][0].set_ylabel("ground-truth masks", fontsize=9)
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for w in text.split():
        if line and len(line) + len(w) + 1 > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + [line]


def plot_patches(image: torch.Tensor, patch: int, tokens: torch.Tensor):
    """Left: the image cut into patches, numbered in the order the ViT reads them. Right: the sequence,
    one row per patch, its C·P·P values (channel-first) as pixels."""
    C_, H, W = image.shape
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [1, 1.6]})
    a.imshow(image.permute(1, 2, 0).numpy())
    for x in range(0, W + 1, patch):
        a.axvline(x - 0.5, color="white", lw=0.8)
    for y in range(0, H + 1, patch):
        a.axhline(y - 0.5, color="white", lw=0.8)
    g = W // patch
    for n in range(tokens.size(0)):
        r, c = divmod(n, g)
        a.text(c * patch + patch / 2 - 0.5, r * patch + patch / 2 - 0.5, str(n), color="white", fontsize=6,
               ha="center", va="center")
    a.set_title(f"{H}×{W} image, {patch}×{patch} patches", fontsize=9)
    a.set_xlabel("x (pixels)"), a.set_ylabel("y (pixels)")
    im = b.imshow(tokens.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    b.set_xlabel(f"value index in the flattened patch (C·P·P = {tokens.size(1)}: red, then green, then blue)")
    b.set_ylabel("patch (token) index")
    b.set_title("the sequence the transformer reads", fontsize=9)
    fig.colorbar(im, ax=b, label="pixel value")
    fig.tight_layout()
    return fig


def plot_positions(pe: torch.Tensor, grid: int, refs=((0, 0), (1, 2), (3, 3))):
    """Cosine similarity of the position embedding of a few reference patches with every patch's."""
    pe = F.normalize(pe.double(), dim=-1)
    fig, axes = plt.subplots(1, len(refs) + 1, figsize=(3.0 * (len(refs) + 1), 3.0))
    im0 = axes[0].imshow(pe.numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1, interpolation="nearest")
    axes[0].set_xlabel("channel (first half: column, second: row)"), axes[0].set_ylabel("patch index")
    axes[0].set_title("2-D sin-cos table", fontsize=9)
    fig.colorbar(im0, ax=axes[0], fraction=0.046)
    for ax, (r, c) in zip(axes[1:], refs):
        sim = (pe @ pe[r * grid + c]).reshape(grid, grid)
        im = ax.imshow(sim.numpy(), cmap="viridis", vmin=float(sim.min()), vmax=1.0)
        ax.plot(c, r, "r*", ms=10, label="reference patch")
        ax.set_title(f"cosine with patch (row {r}, col {c})", fontsize=9)
        ax.set_xlabel("patch column"), ax.set_ylabel("patch row")
        ax.legend(fontsize=7, loc="lower right")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_attention_on_image(image: torch.Tensor, maps: torch.Tensor, query: int, grid: int, windowed=None):
    """maps (L, H, N, N) of one image: per layer, where patch `query` looks (mean over heads), over the image."""
    L = maps.size(0)
    fig, axes = plt.subplots(1, L + 1, figsize=(3.0 * (L + 1), 3.1))
    size = image.shape[-1]
    patch = size // grid
    qr, qc = divmod(query, grid)
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].add_patch(plt.Rectangle((qc * patch - 0.5, qr * patch - 0.5), patch, patch, fill=False, ec="white", lw=2,
                                    label="query patch"))
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_title("image", fontsize=9)
    for l in range(L):
        att = maps[l, :, query].mean(0).reshape(grid, grid)  # (grid, grid)
        ax = axes[l + 1]
        ax.imshow(image.permute(1, 2, 0).numpy())
        im = ax.imshow(np.kron(att.numpy(), np.ones((patch, patch))), cmap="inferno", alpha=0.65,
                       vmin=0.0, vmax=float(att.max()))
        kind = "" if windowed is None else (" (windowed)" if windowed[l] else " (global)")
        ax.set_title(f"layer {l}{kind}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="attention weight")
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_similarity(before: torch.Tensor, after: torch.Tensor, captions):
    """Cosine similarity of N images (rows) with their N captions (columns), before and after training."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, sim, title in ((axes[0], before, "before training"), (axes[1], after, "after training")):
        im = ax.imshow(sim.numpy(), cmap="viridis", vmin=-1, vmax=1)
        ax.set_xticks(range(len(captions)), captions, rotation=70, ha="right", fontsize=6)
        ax.set_yticks(range(len(captions)), [f"image {i}" for i in range(len(captions))], fontsize=6)
        ax.set_xlabel("caption"), ax.set_ylabel("image (its own caption is on the diagonal)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
    fig.tight_layout()
    return fig


def zero_shot_report(model, seen: D.CaptionData, held: D.CaptionData) -> dict:
    """20-way zero-shot accuracy on pairs seen and held out in training, and how often the colour and the
    shape of the prediction are right on their own."""
    out = {"chance (20 prompts)": 1 / len(D.PAIRS), "chance (colour)": 1 / len(D.COLOURS),
           "chance (shape)": 1 / len(D.SHAPES)}
    for name, d in (("seen", seen), ("held-out", held)):
        pred = [D.PAIRS[i] for i in C.zero_shot(model, d.images).tolist()]
        true = [D.PAIRS[i] for i in d.labels.tolist()]
        out[f"{name} pairs"] = sum(p == t for p, t in zip(pred, true)) / len(true)
        out[f"{name} colour"] = sum(p[0] == t[0] for p, t in zip(pred, true)) / len(true)
        out[f"{name} shape"] = sum(p[1] == t[1] for p, t in zip(pred, true)) / len(true)
    out["held-out, among the 4 held-out prompts"] = C.zero_shot_accuracy(model, held.images, held.labels, D.HELD_OUT)
    return out


def plot_zero_shot(before: dict, after: dict):
    keys = ["seen pairs", "held-out pairs", "held-out colour", "held-out shape"]
    chance = [before["chance (20 prompts)"], before["chance (20 prompts)"], before["chance (colour)"],
              before["chance (shape)"]]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ax.bar(x - 0.2, [before[k] for k in keys], 0.4, label="before training")
    ax.bar(x + 0.2, [after[k] for k in keys], 0.4, label="after training")
    ax.scatter(x, chance, marker="_", s=900, color="black", label="chance", zorder=3)
    ax.set_xticks(x, keys)
    ax.set_ylabel("zero-shot accuracy (fraction)")
    ax.set_ylim(0, 1.05)
    ax.set_title("20 prompts 'a {colour} {shape}', one per pair", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
