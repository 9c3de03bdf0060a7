"""Lesson 10, part SAM: train the small segmenter once, then draw its prompts, masks, metrics and the
distilled encoder; the click widget.

Everything runs library code: `course.vision.sam` (model), `course.vision.sam_train` (losses, simulated
clicks, metrics, distillation) and `course.train.train` (the one loop).
"""
from __future__ import annotations

import copy

from dataclasses import dataclass, field

import matplotlib.pyplot as plt
import numpy as np
import torch

from ..device import cpu_threads
from ..train import TrainConfig, train
from ..vision import data as vdata
from ..vision import sam_train as T
from ..vision.sam import SAM, SAMConfig
from ..vision.vit import ViTConfig


@dataclass
class Sizes:
    """The lesson's sizes. Everything here runs on the CPU (the scenes, the click simulation and the model
    stay there), with one thread; the lesson prints how long each training took."""
    steps: int = 400
    batch: int = 32
    rounds: int = 2
    n_train: int = 2000
    n_eval: int = 60
    distill_steps: int = 200
    text_steps: int = 400
    text_lr: float = 3e-3
    teacher: dict = field(default_factory=lambda: dict(enc_layers=3, enc_dim=64, enc_heads=4))
    student: dict = field(default_factory=lambda: dict(n_layer=1, n_embd=32, n_head=2))

    @classmethod
    def from_profile(cls, prof) -> "Sizes":
        """The same sizes on every machine (they are CPU sizes), except under the `smoke` profile, which
        only runs the code: a few steps on a few scenes."""
        if prof.name == "smoke":
            n = prof.max_steps
            return cls(steps=n, batch=8, n_train=64, n_eval=8, distill_steps=n, text_steps=n)
        return cls()


def train_segmenter(sizes: Sizes, seed: int = 0):
    """The teacher segmenter trained by simulated interaction -> (sam, history, SceneBatches)."""
    torch.manual_seed(seed)
    data = T.SceneBatches(n_train=sizes.n_train, batch=sizes.batch, seed=seed)
    sam = SAM(SAMConfig(**sizes.teacher))
    cfg = TrainConfig(max_steps=sizes.steps, lr=3e-3, warmup_steps=min(20, sizes.steps), weight_decay=0.01, eval_interval=100,
                      eval_iters=2, seed=seed)
    with cpu_threads(1):  # tiny model: one thread, also when run outside the lesson's set-up
        hist = train(T.InteractiveTrainer(sam, rounds=sizes.rounds), data, cfg, label="segmenter")
    return sam.eval(), hist, data


def distill_encoder(teacher: SAM, sizes: Sizes, seed: int = 0):
    """MobileSAM's decoupled distillation: a small ViT + neck matched to the teacher's embedding (MSE)."""
    student_cfg = ViTConfig(image_size=teacher.cfg.image_size, patch_size=teacher.cfg.patch_size, **sizes.student)
    torch.manual_seed(seed)
    dist = T.EncoderDistiller(teacher, student_cfg)
    cfg = TrainConfig(max_steps=sizes.distill_steps, lr=3e-3, warmup_steps=min(10, sizes.distill_steps), weight_decay=0.01, eval_interval=100,
                      eval_iters=2, seed=seed)
    with cpu_threads(1):  # tiny model: one thread, also when run outside the lesson's set-up
        hist = train(dist, T.image_batches(batch=sizes.batch, seed=seed + 1), cfg, label="distill")
    return dist.sam().eval(), hist


def train_text_prompts(sam: SAM, clip, sizes: Sizes, data: T.SceneBatches, seed: int = 0):
    """SAM appendix D.5 on the trained segmenter: a copy with a text channel (SAMConfig(text_dim=CLIP's
    embedding width), a new linear projection), fine-tuned with the CLIP IMAGE embedding of each target's
    crop as the first prompt; the image side (ViT, neck, high-resolution stem) stays frozen, so only the
    prompt encoder and the decoder learn. -> (text segmenter, history)."""
    torch.manual_seed(seed)
    data = copy.copy(data)  # the same scenes, drawn in a fixed order whatever was drawn from them before
    data.gen = torch.Generator().manual_seed(seed)
    tsam = SAM(sam.cfg.replace(text_dim=clip.config.embed_dim))
    missing, unexpected = tsam.load_state_dict(sam.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("prompt_encoder.text_proj") for k in missing), (missing, unexpected)
    for part in (tsam.encoder, tsam.neck, tsam.hires):
        if part is not None:
            part.requires_grad_(False)
    clip.requires_grad_(False)
    cfg = TrainConfig(max_steps=sizes.text_steps, lr=sizes.text_lr, warmup_steps=min(10, sizes.text_steps), weight_decay=0.01,
                      eval_interval=sizes.text_steps, eval_iters=2, seed=seed)
    with cpu_threads(1):  # tiny model: one thread, also when run outside the lesson's set-up
        hist = train(T.InteractiveTrainer(tsam, rounds=1), T.TextBatches(data, clip), cfg, label="text prompts")
    return tsam.eval(), hist


def text_queries(scenes):
    """Every top-level object of the scenes holding two or more top-level objects that read differently:
    (scene index, object k, another top-level object j of the same scene, k's description as CLIP's captions
    phrase it, "a red circle inside a blue square" for a nested one)."""
    out = []
    for i, s in enumerate(scenes):
        top = [k for k, p in enumerate(s.parent.tolist()) if p < 0]
        names = {k: vdata._describe(k, s.shapes, s.colours, s.parent.tolist()) for k in top}
        if len(top) < 2 or len(set(names.values())) < len(top):
            continue
        out += [(i, k, top[(n + 1) % len(top)], names[k]) for n, k in enumerate(top)]
    return out


@torch.no_grad()
def text_prompt_eval(tsam: SAM, clip, tokenizer, scenes, queries=None) -> dict:
    """Prompt by CLIP's TEXT embedding of one object's name; IoU of the chosen mask with the named object
    ('right') and with another object of the same scene ('wrong'). A segmenter that ignored the text would
    score the two the same on average, since which object is named is symmetric."""
    queries = text_queries(scenes) if queries is None else queries
    images = vdata.stack_images([scenes[i] for i, *_ in queries])
    text = clip.eval().encode_text(tokenizer.encode([q[3] for q in queries], clip.config.context))
    logits, iou = tsam.predict(images, text=text)
    pred = T.best_mask(logits, iou) > 0
    right = T.mask_iou(pred, torch.stack([scenes[i].masks[k] for i, k, _, _ in queries]))
    wrong = T.mask_iou(pred, torch.stack([scenes[i].masks[j] for i, _, j, _ in queries]))
    return dict(right=right, wrong=wrong, queries=queries, text=text, masks=pred)


def text_figure(scenes, ev: dict, n: int = 4):
    """The first n text prompts: the image, then the chosen mask with its IoU against the named object."""
    fig, axes = plt.subplots(2, n, figsize=(2.1 * n, 4.6), squeeze=False)
    for c, (i, k, _, name) in enumerate(ev["queries"][:n]):
        _show(axes[0, c], scenes[i].image, None, f"scene {i}")
        _show(axes[1, c], scenes[i].image, ev["masks"][c], f'"{name}"\nIoU with it {ev["right"][c]:.2f}')
    fig.tight_layout()
    return fig


def measure(sam: SAM, ev, max_clicks: int = 10) -> dict:
    clicks = T.evaluate_clicks(sam, *ev, max_clicks=max_clicks)
    out = T.summary(clicks, T.evaluate_boxes(sam, *ev), ev[1])
    out["curve_pred"], out["curve_oracle"] = clicks["pred"].mean(0).tolist(), clicks["oracle"].mean(0).tolist()
    return out


# ---------------------------------------------------------------- figures
def _show(ax, image, mask=None, title="", colour=(1.0, 0.0, 1.0)):
    ax.imshow(image.permute(1, 2, 0).numpy())
    if mask is not None:
        over = np.zeros((*mask.shape, 4))
        over[mask.numpy()] = (*colour, 0.55)
        ax.imshow(over)
    ax.set_title(title, fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])


def _draw_points(ax, points, labels):
    for (x, y), l in zip(points.tolist(), labels.tolist()):
        if l >= 0:  # pixel (row i, column j) is drawn centred at (j, i): the centre (j+0.5, i+0.5) sits at -0.5
            ax.plot(x - 0.5, y - 0.5, marker="*", ms=11, color="lime" if l == 1 else "red", mec="black")


def prompt_row(axes, sam, scene, k, kind: str, text_embed=None):
    """One row: the image with the prompt, then the three masks titled with predicted and real IoU."""
    img, target = scene.image, scene.masks[k]
    prompts, label = {}, kind
    if kind == "point":
        pt, lab = T.next_click(torch.zeros_like(target)[None], target[None])
        prompts = dict(points=pt[:, None], labels=lab[:, None])
    elif kind == "box":
        prompts = dict(boxes=T.mask_boxes(target[None]))
    elif kind == "mask":  # a rough mask: the target's box, filled, as logits
        box = T.mask_boxes(target[None])[0].long().tolist()
        m = torch.full((1, 1, *target.shape), -4.0)
        m[..., box[1]:box[3], box[0]:box[2]] = 4.0
        prompts = dict(masks=m)
    elif kind == "text":
        prompts, label = dict(text=text_embed), "text"
    with torch.no_grad():
        logits, iou = sam.predict(img[None], **prompts)
    _show(axes[0], img, None, f"{label} prompt")
    if "points" in prompts:
        _draw_points(axes[0], prompts["points"][0], prompts["labels"][0])
    if "boxes" in prompts:
        x0, y0, x1, y1 = prompts["boxes"][0].tolist()
        axes[0].add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="lime", lw=1.5))
    if "masks" in prompts:
        axes[0].imshow(prompts["masks"][0, 0].numpy() > 0, alpha=0.3, cmap="gray")
    real = T.mask_iou(logits[0] > 0, target[None])
    best = int(iou[0].argmax())
    for j in range(3):
        _show(axes[1 + j], img, logits[0, j] > 0, f"mask {j}{' (chosen)' if j == best else ''}\n"
                                                  f"predicted IoU {iou[0, j]:.2f}, real {real[j]:.2f}")


def prompts_figure(sam, scene, k, kinds=("point", "box", "mask"), text_embed=None):
    fig, axes = plt.subplots(len(kinds), 4, figsize=(8, 2.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        prompt_row(row, sam, scene, k, kind, text_embed)
    fig.tight_layout()
    return fig


def find_nested(scenes):
    """(scene index, outer k, inner k) of the first scene holding a nested object."""
    for i, s in enumerate(scenes):
        for k, p in enumerate(s.parent.tolist()):
            if p >= 0:
                return i, p, k
    raise ValueError("no nested object in these scenes: draw more (nest_prob > 0)")


def ambiguity(sam, scene, outer, inner):
    """One click at the centre of the inner shape: each mask's IoU with the inner shape and the whole object."""
    pt, _ = T.next_click(torch.zeros_like(scene.masks[inner])[None], scene.masks[inner][None])
    with torch.no_grad():
        logits, iou = sam.predict(scene.image[None], points=pt[:, None], labels=torch.ones(1, 1, dtype=torch.long))
    m = logits[0] > 0
    return dict(point=pt[0], masks=m, predicted=iou[0], iou_inner=T.mask_iou(m, scene.masks[inner][None]),
                iou_whole=T.mask_iou(m, scene.masks[outer][None]))


def ambiguity_figure(scene, amb):
    fig, axes = plt.subplots(1, 4, figsize=(8, 2.4))
    _show(axes[0], scene.image, None, "one click on the inner shape")
    _draw_points(axes[0], amb["point"][None], torch.ones(1, dtype=torch.long))
    for j in range(3):
        _show(axes[1 + j], scene.image, amb["masks"][j], f"mask {j}: predicted IoU {amb['predicted'][j]:.2f}\n"
              f"IoU inner {amb['iou_inner'][j]:.2f}, whole {amb['iou_whole'][j]:.2f}")
    fig.tight_layout()
    return fig


def curves_figure(results: dict):
    """mIoU after k clicks (chosen mask and oracle best of three) for each model, with the box baseline."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in results.items():
        k = np.arange(1, len(r["curve_pred"]) + 1)
        line, = ax.plot(k, r["curve_pred"], "o-", label=f"{name}: mask of largest predicted IoU")
        ax.plot(k, r["curve_oracle"], "--", color=line.get_color(), label=f"{name}: oracle best of three")
    base = next(iter(results.values()))["miou_box_baseline"]
    ax.axhline(base, color="gray", ls=":", label="baseline: the target's box, filled")
    for thr in (0.85, 0.90):
        ax.axhline(thr, color="black", lw=0.5, alpha=0.4)
    ax.set_xlabel("clicks (each at the deepest point of the larger error)")
    ax.set_ylabel("mean IoU on held-out objects")
    ax.grid(alpha=0.3), ax.legend(fontsize=7)
    names = list(results)
    x = np.arange(len(names))
    ax2.bar(x - 0.2, [results[n]["noc85"] for n in names], 0.4, label="NoC@85")
    ax2.bar(x + 0.2, [results[n]["noc90"] for n in names], 0.4, label="NoC@90")
    ax2.set_xticks(x, names)
    ax2.set_ylabel(f"clicks to reach the IoU (max {results[names[0]]['max_clicks']})")
    ax2.grid(alpha=0.3, axis="y"), ax2.legend()
    fig.tight_layout()
    return fig


def speed_quality_figure(rows: dict):
    """rows: name -> dict(ms=encoder ms/image, miou=..., params=...)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, r in rows.items():
        ax.scatter(r["ms"], r["miou"], s=40 + r["params"] / 2000, label=f"{name} ({r['params']:,} encoder params)")
    ax.set_xlabel("image encoder time (ms / image, this CPU)")
    ax.set_ylabel("mIoU after 3 clicks")
    ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- the click widget
def click_masks(sam, scene, x: float, y: float):
    """The masks for one foreground click at (x, y) (pixels): (logits > 0 (3, S, S), predicted IoU (3,))."""
    with torch.no_grad():
        logits, iou = sam.predict(scene.image[None], points=torch.tensor([[[float(x), float(y)]]]),
                                  labels=torch.ones(1, 1, dtype=torch.long))
    return logits[0] > 0, iou[0]


def draw_click(sam, scene, x, y, fig=None):
    masks, iou = click_masks(sam, scene, x, y)
    fig = fig or plt.figure(figsize=(8, 2.3))
    axes = fig.subplots(1, 4)
    _show(axes[0], scene.image, None, f"click at ({x:.1f}, {y:.1f})")
    _draw_points(axes[0], torch.tensor([[x, y]]), torch.ones(1, dtype=torch.long))
    best = int(iou.argmax())
    for j in range(3):
        _show(axes[1 + j], scene.image, masks[j], f"mask {j}{' (chosen)' if j == best else ''}: IoU≈{iou[j]:.2f}")
    fig.tight_layout()
    return fig


def click_demo(sam, scenes):
    """ipywidgets: pick a scene and a click position (x, y sliders, pixel centres)."""
    import ipywidgets as w
    S = scenes[0].image.shape[-1]

    def show(scene, x, y):
        draw_click(sam, scenes[scene], x, y)
        plt.show()
    return w.interactive(show, scene=w.IntSlider(0, 0, len(scenes) - 1),
                         x=w.FloatSlider(S / 2 + 0.5, min=0.5, max=S - 0.5, step=1.0),
                         y=w.FloatSlider(S / 2 + 0.5, min=0.5, max=S - 0.5, step=1.0))
