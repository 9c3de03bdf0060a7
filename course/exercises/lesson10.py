"""Lesson 10 (ViT / CLIP): cut an image into patches, and CLIP's contrastive loss.

ViT (Dosovitskiy et al. 2021, section 3.1): an image (C, H, W) becomes N = HW/P² patches, each
flattened to a vector of C·P² values, in row-major order over the patch grid. CLIP (Radford et al.
2021, figure 3): L2-normalise both embeddings, logits = image · textᵀ / temperature, and average the
cross-entropies of both directions with the matching pair (the diagonal) as the target.

References: the library's `course.vision.vit.patchify` (reshape + permute; tests/test_vision_clip.py
checks it equals PyTorch's F.unfold, which flattens each patch channel-first, (C, P, P)) and
`course.vision.clip.contrastive_loss` (which takes the scale 1/temperature). Comparisons in float64:
the claims are equalities; the loss's few reductions round far below 1e-12 relative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..vision.clip import contrastive_loss
from ..vision.vit import patchify
from .core import Hint, call, close, exercise, expect_tensor, match_mistake


def _patchify(images, patch):
    """Reference solution: (B, C, H, W) -> (B, N, C·P·P), patches row-major, each flattened (C, P, P)."""
    return patchify(images, patch)


@exercise("10", "patchify", solution=_patchify)
def check_patchify(fn, rng, gen):
    """patchify(images, patch) -> (B, N, C·P·P): N = (H/P)·(W/P) patches in row-major order over the grid
    (left to right, then top to bottom), each patch flattened channel-first, as (C, P, P)."""
    cases = [(1, 1, 4, 4, 2), (2, 3, 6, 4, 2), (1, 3, 8, 12, 4), (2, 2, 9, 6, 3)]
    for B, C, H, W, P in cases:
        x = torch.arange(B * C * H * W, dtype=torch.float64).reshape(B, C, H, W)  # every pixel distinct
        what = f"patchify(images {(B, C, H, W)}, patch={P})"
        N, D = (H // P) * (W // P), C * P * P
        got = expect_tensor(call(fn, x.clone(), P, describe=what), what, shape=(B, N, D))
        want = _patchify(x, P)
        if torch.equal(got, want):
            continue
        grid = x.reshape(B, C, H // P, P, W // P, P)
        mistakes = {
            "the patches come out column by column: order them row-major, left to right, then top to bottom":
                grid.permute(0, 4, 2, 1, 3, 5).reshape(B, N, D),
            "each patch is flattened channel-last (P, P, C); flatten it channel-first, as (C, P, P)":
                grid.permute(0, 2, 4, 3, 5, 1).reshape(B, N, D),
            "a plain reshape mixes rows of different patches: split H and W into (H/P, P) and (W/P, P), move the "
            "two grid axes in front, then flatten":
                x.reshape(B, N, D),
        }
        hint = match_mistake(got, mistakes, rtol=0)
        raise Hint(f"{what}: {hint}" if hint else f"{what}: patch 0 should hold pixels {want[0, 0, :6].tolist()}..., "
                                                  f"yours holds {got[0, 0, :6].tolist()}...")
    return f"{len(cases)} image shapes with distinct pixel values"


def _clip_loss(image_emb, text_emb, temperature):
    """Reference solution (Radford et al. 2021, figure 3): the library's loss, whose scale is 1/temperature."""
    return contrastive_loss(image_emb, text_emb, 1.0 / temperature)


@exercise("10", "clip_loss", solution=_clip_loss)
def check_clip_loss(fn, rng, gen):
    """clip_loss(image_emb, text_emb, temperature) -> scalar: symmetric InfoNCE over a batch of N
    matching (image, text) pairs, embeddings (N, D), L2-normalised, logits divided by the temperature."""
    cases = 6
    for _ in range(cases):
        N, D, t = rng.randint(2, 9), rng.randint(2, 8), rng.choice([0.07, 0.5, 1.0])
        img = torch.randn(N, D, generator=gen, dtype=torch.float64) * 3
        txt = torch.randn(N, D, generator=gen, dtype=torch.float64) * 3
        got = call(fn, img.clone(), txt.clone(), t, describe=f"clip_loss(({N}, {D}), ({N}, {D}), {t})")
        expect_tensor(got, "clip_loss(...)", shape=())
        want = _clip_loss(img, txt, t)
        if close(got, want, 1e-12, 1e-12):
            continue
        labels = torch.arange(N)
        ni, nt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
        logits = ni @ nt.T / t
        mistakes = {
            "normalise both embeddings to unit length first (F.normalize(..., dim=-1)): CLIP compares cosines":
                (F.cross_entropy(img @ txt.T / t, labels) + F.cross_entropy(txt @ img.T / t, labels)) / 2,
            "only the image -> text direction: CLIP averages both directions, cross_entropy(logits) and "
            "cross_entropy(logits.T)": F.cross_entropy(logits, labels),
            "you multiplied by the temperature: logits are cosine similarities DIVIDED by the temperature":
                (F.cross_entropy(ni @ nt.T * t, labels) + F.cross_entropy(nt @ ni.T * t, labels)) / 2,
        }
        hint = match_mistake(got, mistakes, rtol=1e-12, atol=1e-12)
        raise Hint(hint or f"clip_loss gave {float(got):.6f} for a batch of {N}, expected {float(want):.6f}")
    return f"{cases} random batches and temperatures"
