"""Training and measuring the segmenter of course.vision.sam: losses, simulated clicks, metrics, distillation.

- Loss (SAM, Kirillov et al. 2023, appendix A "Losses"): 20·focal + 1·dice per predicted mask (focal:
  Lin et al. 2017, alpha 0.25, gamma 2; dice: Milletari et al. 2016), and only the BEST of the three
  masks is trained ("we only backpropagate the minimum loss over masks", section 3, "Resolving
  ambiguity"); plus the mean-squared error between each predicted IoU and that mask's real IoU with
  the ground truth (weight 1).
- Interactive training (appendix A "Training algorithm"): the first prompt is, with equal
  probability, a foreground point uniform in the target mask or the target's box with noise (std 10%
  of the side); each later click is drawn uniformly from the ERROR region of the previous prediction
  (foreground if there it missed the object, background if it spilled over), and the previous mask's
  unthresholded logits come back as the mask prompt; the mask passed on is the one of largest
  predicted IoU. SAM runs 11 rounds (8 sampled clicks and 2 rounds with no new click); `rounds` here
  is smaller to train on a CPU. SAM 2 trains the same way (Ravi et al. 2024; its training code,
  training/model/sam2.py `prepare_prompt_inputs`, keeps the ground truth to sample correction clicks).
  `InteractiveTrainer` does this inside forward(images, targets) -> (logits, loss), so the one loop
  `course.train.train` trains it (its "tokens/s" counts pixels/s).
- Metrics (the interactive-segmentation protocol of Xu et al. 2016 as RITM, Sofiiuk et al. 2022,
  codes it): each click goes to the point deepest inside the larger error region (false negatives or
  false positives, "larger" by the distance to its border): the maximum of the Euclidean distance
  transform, foreground if that region is a miss. mIoU after one click (the mask of largest predicted
  IoU, and the oracle best of three as SAM reports, section 7.1) and NoC@85 / NoC@90, the clicks
  needed to reach 85% / 90% IoU (max_clicks when never reached). Baseline: the target's box, filled.
- Encoder distillation (MobileSAM, Zhang et al. 2023, section 3, "decoupled distillation"): a small
  image encoder is trained alone to reproduce the big one's image embedding (MSE), then used with the
  big model's prompt encoder and mask decoder unchanged.

Masks are (B, S, S) bool; points (x, y) pixel centres as in course.vision.data.
"""
from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data as vdata
from .sam import BOTTOM_RIGHT, PAD, POS, SAM, TOP_LEFT
from .vit import ViT, ViTConfig

FOCAL_WEIGHT, DICE_WEIGHT, IOU_WEIGHT = 20.0, 1.0, 1.0  # appendix A: focal:dice = 20:1, IoU MSE x 1


# ---------------------------------------------------------------- losses
def focal_loss(logits, target, alpha=0.25, gamma=2.0):
    """Sigmoid focal loss (Lin et al. 2017, eq. 5) averaged over pixels: (..., S, S) -> (...)."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).flatten(-2).mean(-1)


def dice_loss(logits, target, eps=1.0):
    """1 - (2|P∩T| + 1) / (|P| + |T| + 1) on soft masks P = sigmoid(logits): (..., S, S) -> (...)."""
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def mask_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks (..., S, S) -> (...); 1 where both are empty."""
    inter, union = (pred & target).flatten(-2).sum(-1), (pred | target).flatten(-2).sum(-1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float))


def sam_loss(logits, iou_pred, target):
    """logits (B, M, S, S), iou_pred (B, M), target (B, S, S) bool -> (loss, per-mask loss (B, M), best (B,))."""
    t = target.unsqueeze(1).to(logits.dtype).expand_as(logits)
    per_mask = FOCAL_WEIGHT * focal_loss(logits, t) + DICE_WEIGHT * dice_loss(logits, t)  # (B, M)
    best = per_mask.argmin(1)
    mask_term = per_mask.gather(1, best[:, None]).mean()  # only the minimum over masks is trained
    with torch.no_grad():
        real_iou = mask_iou(logits > 0, target.unsqueeze(1))  # (B, M)
    return mask_term + IOU_WEIGHT * F.mse_loss(iou_pred, real_iou.to(iou_pred.dtype)), per_mask, best


# ---------------------------------------------------------------- simulated prompts
def pixel_centres(index: torch.Tensor, S: int) -> torch.Tensor:
    """Flat pixel index (...,) -> (x, y) of its centre (..., 2)."""
    return torch.stack([index % S + 0.5, index // S + 0.5], -1).float()


def sample_clicks(pred: torch.Tensor, target: torch.Tensor, generator=None):
    """One click per row drawn uniformly from the error region pred XOR target (B, S, S):
    -> points (B, 2), labels (B,) 1 where the click falls on a miss (target & ~pred), 0 on a spill,
    PAD (-1) where the prediction is already exact."""
    err = (pred ^ target).flatten(1)  # (B, S·S)
    has = err.any(1)
    w = err.float() + (~has).float()[:, None]  # rows with no error: any pixel, then padded
    idx = torch.multinomial(w, 1, generator=generator)[:, 0]
    labels = target.flatten(1).gather(1, idx[:, None])[:, 0].long()  # in the target: a miss -> foreground
    return pixel_centres(idx, pred.size(-1)), torch.where(has, labels, torch.full_like(labels, PAD))


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(B, S, S) bool -> tight boxes (B, 4) (x0, y0, x1, y1) in pixel edges."""
    S = masks.size(-1)
    ar = torch.arange(S, device=masks.device)
    cols, rows = masks.any(1), masks.any(2)  # (B, S) each
    big = S + 1
    x0 = torch.where(cols, ar, big).min(1).values
    x1 = torch.where(cols, ar, -1).max(1).values + 1
    y0 = torch.where(rows, ar, big).min(1).values
    y1 = torch.where(rows, ar, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], 1).float()


def noisy_boxes(masks, noise=0.1, generator=None):
    """The masks' boxes with each coordinate moved by N(0, (noise·side)²), kept in the image, size >= 1."""
    box = mask_boxes(masks)
    side = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]] * 2, 1)  # (w, h, w, h)
    box = box + noise * side * torch.randn(box.shape, generator=generator)
    S = masks.size(-1)
    x0, y0 = box[:, 0].clamp(0, S - 1), box[:, 1].clamp(0, S - 1)
    return torch.stack([x0, y0, torch.maximum(box[:, 2].clamp(max=S), x0 + 1),
                        torch.maximum(box[:, 3].clamp(max=S), y0 + 1)], 1)


def best_mask(logits, iou):
    """The mask of largest predicted IoU: (B, M, S, S), (B, M) -> (B, S, S) logits."""
    return logits[torch.arange(len(logits)), iou.argmax(1)]


class InteractiveTrainer(nn.Module):
    """forward(images, targets) -> (last logits, loss averaged over `rounds` simulated interactions)."""

    def __init__(self, sam: SAM, rounds: int = 3, box_prob: float = 0.5):
        super().__init__()
        self.sam, self.rounds, self.box_prob = sam, rounds, box_prob

    def forward(self, images, targets, text=None):
        """images (B, 3, S, S), targets (B, S, S) bool; text (B, text_dim) embeddings of the targets, or None.
        With text, the first prompt is the text alone (then clicks); without, a point or a box."""
        sam, B = self.sam, len(images)
        emb = sam.embed_image(images)  # once per image, as SAM amortises its encoder
        with torch.no_grad():
            click, lab = sample_clicks(torch.zeros_like(targets), targets)
            box = noisy_boxes(targets)
            use_box = torch.rand(B) < self.box_prob
        pad = torch.full_like(lab, PAD)
        points = torch.stack([click, box[:, :2], box[:, 2:]], 1)  # (B, 3, 2): click, box corners
        labels = torch.stack([torch.where(use_box, pad, lab), torch.where(use_box, TOP_LEFT, pad),
                              torch.where(use_box, BOTTOM_RIGHT, pad)], 1)
        if text is not None:
            labels = torch.full_like(labels, PAD)
        prev, total = None, 0.0
        for _ in range(self.rounds):
            logits, iou = sam.decode(emb, check=False, points=points, labels=labels, masks=prev, text=text)
            total = total + sam_loss(logits, iou, targets)[0]
            with torch.no_grad():
                prev = best_mask(logits, iou).unsqueeze(1)  # (B, 1, S, S) unthresholded
                click, lab = sample_clicks(prev[:, 0] > 0, targets)
            points, labels = torch.cat([points, click[:, None]], 1), torch.cat([labels, lab[:, None]], 1)
        return logits, total / self.rounds


def object_crops(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each target object alone on black (B, 3, S, S): what SAM (appendix D.5) embeds with CLIP's IMAGE
    encoder to train text prompts, relying on CLIP's aligned TEXT embedding at inference."""
    return images * targets[:, None]


class TextBatches:
    """batch_fn for text prompts (SAM appendix D.5): (images, one object's mask, the CLIP IMAGE embedding of
    that object's crop (B, E)). A frozen CLIP turns each crop into the embedding the segmenter learns to follow;
    at inference CLIP's TEXT embedding of the object's name stands in for it."""

    def __init__(self, scenes: "SceneBatches", clip: nn.Module):
        self.scenes, self.clip = scenes, clip

    @torch.no_grad()
    def __call__(self, split: str):
        images, targets = self.scenes(split)
        was = self.clip.training
        embed = self.clip.eval().encode_image(object_crops(images, targets))
        self.clip.train(was)
        return images, targets, embed


class SceneBatches:
    """Random (image, one object's whole mask) pairs from generated scenes; batch_fn(split) for train()."""

    def __init__(self, n_train=2000, n_val=200, size=32, batch=32, seed=0, nest_prob=0.5):
        self.batch = batch
        self.gen = torch.Generator().manual_seed(seed)
        self.pools = {"train": self._pool(vdata.make_scenes(n_train, seed, size, nest_prob=nest_prob)),
                      "val": self._pool(vdata.make_scenes(n_val, seed + 10_000, size, nest_prob=nest_prob))}

    @staticmethod
    def _pool(scenes):
        images = vdata.stack_images(scenes)
        owner = torch.tensor([i for i, s in enumerate(scenes) for _ in range(len(s.masks))])
        return images, torch.cat([s.masks for s in scenes]), owner

    def __call__(self, split: str):
        images, masks, owner = self.pools["val" if split == "val" else "train"]
        k = torch.randint(len(masks), (self.batch,), generator=self.gen)
        return images[owner[k]], masks[k]


# ---------------------------------------------------------------- metrics
def distance_transform(mask: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean distance from each True pixel to the nearest False one, outside the image
    counting as False: (B, S, S) bool -> (B, S, S) float (0 on False pixels). Separable (Felzenszwalb &
    Huttenlocher 2012): d²(i, j) = min_j' [(j - j')² + g(i, j')²], g the distance down the column; each
    minimum is taken over all candidates at once (O(S³) per image, ample for S <= 64)."""
    B, S, _ = mask.shape
    m = F.pad(mask, (1, 1, 1, 1), value=False)  # (B, S+2, S+2)
    r = torch.arange(S + 2, dtype=torch.float32)
    d1 = (r[:, None] - r[None, :]).abs()  # (S+2, S+2) |i - i'|
    inf = torch.tensor(float("inf"))
    g = torch.where(~m[:, None, :, :], d1[None, :, :, None], inf).amin(2)  # (B, i, j): min over i' of bg rows
    d2 = torch.where(torch.isfinite(g)[:, :, None, :], g[:, :, None, :] ** 2 + d1[None, None] ** 2, inf).amin(3)
    return d2.sqrt()[:, 1:-1, 1:-1] * mask


def next_click(pred: torch.Tensor, target: torch.Tensor):
    """The evaluation click: the deepest point of the larger error region. -> points (B, 2), labels (B,)."""
    fn, fp = target & ~pred, pred & ~target
    dfn, dfp = distance_transform(fn).flatten(1), distance_transform(fp).flatten(1)
    positive = dfn.amax(1) >= dfp.amax(1)
    d = torch.where(positive[:, None], dfn, dfp)
    idx = d.argmax(1)  # first maximum in raster order: deterministic
    labels = torch.where(d.amax(1) > 0, positive.long(), torch.full_like(idx, PAD))
    return pixel_centres(idx, pred.size(-1)), labels


def box_baseline_iou(targets: torch.Tensor) -> torch.Tensor:
    """IoU of each target (B, S, S) with its own tight box, filled: the trivial baseline."""
    S = targets.size(-1)
    b = mask_boxes(targets)
    ar = torch.arange(S) + 0.5
    inside_x = (ar[None] > b[:, :1]) & (ar[None] < b[:, 2:3])
    inside_y = (ar[None] > b[:, 1:2]) & (ar[None] < b[:, 3:4])
    return mask_iou(inside_y[:, :, None] & inside_x[:, None, :], targets)


def eval_set(n_scenes=100, seed=123, size=32, nest_prob=0.5):
    """Held-out scenes (a seed not used in training) as (images (N,3,S,S), targets (T,S,S), owner (T,))."""
    return SceneBatches._pool(vdata.make_scenes(n_scenes, seed, size, nest_prob=nest_prob))


@torch.no_grad()
def evaluate_clicks(sam: SAM, images, targets, owner, max_clicks=10, chunk=256):
    """Clicks at the deepest error point, previous best mask fed back -> dict of (T, max_clicks) IoUs:
    'pred' (the mask of largest predicted IoU) and 'oracle' (best of the three)."""
    was = sam.training
    sam.eval()
    pred_iou, oracle_iou = [], []
    for s in range(0, len(targets), chunk):
        tg, own = targets[s:s + chunk], owner[s:s + chunk]
        emb = sam.embed_image(images[own])
        pts, labs, prev = [], [], None
        pred = torch.zeros_like(tg)
        p_row, o_row = [], []
        for _ in range(max_clicks):
            pt, lab = next_click(pred, tg)
            pts.append(pt), labs.append(lab)
            logits, iou = sam.decode(emb, check=False, points=torch.stack(pts, 1), labels=torch.stack(labs, 1),
                                     masks=prev)
            prev = best_mask(logits, iou).unsqueeze(1)
            pred = prev[:, 0] > 0
            p_row.append(mask_iou(pred, tg)), o_row.append(mask_iou(logits > 0, tg[:, None]).amax(1))
        pred_iou.append(torch.stack(p_row, 1)), oracle_iou.append(torch.stack(o_row, 1))
    sam.train(was)
    return {"pred": torch.cat(pred_iou), "oracle": torch.cat(oracle_iou)}


@torch.no_grad()
def evaluate_boxes(sam: SAM, images, targets, owner, chunk=256):
    """IoU with the exact box as the prompt (mask of largest predicted IoU) -> (T,)."""
    out = []
    for s in range(0, len(targets), chunk):
        tg = targets[s:s + chunk]
        logits, iou = sam.predict(images[owner[s:s + chunk]], boxes=mask_boxes(tg))
        out.append(mask_iou(best_mask(logits, iou) > 0, tg))
    return torch.cat(out)


def noc(ious: torch.Tensor, threshold: float) -> torch.Tensor:
    """Number of clicks to reach `threshold` IoU per target (T, K) -> (T,), K when never reached."""
    reached = ious >= threshold
    first = reached.float().argmax(1) + 1
    return torch.where(reached.any(1), first, torch.full_like(first, ious.size(1))).float()


def summary(clicks: dict, boxes: torch.Tensor, targets: torch.Tensor) -> dict:
    return {"miou_1click": clicks["pred"][:, 0].mean().item(), "miou_1click_oracle": clicks["oracle"][:, 0].mean().item(),
            "noc85": noc(clicks["pred"], 0.85).mean().item(), "noc90": noc(clicks["pred"], 0.90).mean().item(),
            "miou_box": boxes.mean().item(), "miou_box_baseline": box_baseline_iou(targets).mean().item(),
            "max_clicks": clicks["pred"].size(1), "n_targets": len(targets)}


# ---------------------------------------------------------------- MobileSAM-style distillation
class EncoderDistiller(nn.Module):
    """A student image encoder + neck trained to match a frozen teacher SAM's image embedding (MSE).
    forward(images) -> (student embedding, loss). `.sam()` is the student with the teacher's decoder."""

    def __init__(self, teacher: SAM, student_cfg: ViTConfig):
        super().__init__()
        self.teacher = [teacher]  # a list: not a submodule, so not trained or counted
        self.student = SAM(teacher.cfg, encoder=ViT(student_cfg))
        self.student.prompt_encoder = copy.deepcopy(teacher.prompt_encoder).requires_grad_(False)
        self.student.decoder = copy.deepcopy(teacher.decoder).requires_grad_(False)
        self.student.hires = copy.deepcopy(teacher.hires)  # the cheap stem is reused, like the decoder
        if self.student.hires is not None:
            self.student.hires.requires_grad_(False)

    def forward(self, images):
        with torch.no_grad():
            target = self.teacher[0].embed_image(images).image
        emb = self.student.embed_image(images).image
        return emb, F.mse_loss(emb, target)

    def sam(self) -> SAM:
        return self.student


def image_batches(n=2000, size=32, batch=32, seed=1):
    """batch_fn for distillation: images only (no masks are needed), val from other seeds."""
    pools = {"train": vdata.stack_images(vdata.make_scenes(n, seed, size)),
             "val": vdata.stack_images(vdata.make_scenes(200, seed + 10_000, size))}
    gen = torch.Generator().manual_seed(seed)

    def batch_fn(split):
        pool = pools["val" if split == "val" else "train"]
        return (pool[torch.randint(len(pool), (batch,), generator=gen)],)
    return batch_fn


@torch.no_grad()
def encoder_ms(sam: SAM, images: torch.Tensor, repeats: int = 5) -> float:
    """Median milliseconds per image of embed_image on `images` (one batch)."""
    sam.eval()
    sam.embed_image(images)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sam.embed_image(images)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000 / len(images)
