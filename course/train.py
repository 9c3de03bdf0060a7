"""A plain training loop: AdamW, linear warmup + cosine decay, clipping, accumulation, eval.

Everything a lesson needs to see is measured here and kept in a `History`: train and
validation loss, learning rate, tokens/s and model FLOPs utilisation (MFU, PaLM appendix B:
achieved model FLOP/s over the device's peak; reported only for GPUs in `course.device.PEAK_FLOPS`).

    hist = train(model, lambda split: data.batch(split, 16, 128), TrainConfig(max_steps=300))
    hist.plot()
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from .device import peak_flops

Batch = tuple  # (x, y) or (x, y, attn_mask)


@dataclass
class TrainConfig:
    max_steps: int = 300
    batch_size: int = 16  # sequences per micro-batch (informational: batch_fn makes the batches)
    block_size: int = 128
    lr: float = 1e-3
    min_lr: float | None = None  # end of the cosine; default lr / 10
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_interval: int = 50
    eval_iters: int = 10
    seed: int = 0
    autocast_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 on a GPU; None = full precision
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.min_lr is None:
            self.min_lr = self.lr / 10


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at cfg.max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@dataclass(repr=False)
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float | None] = field(default_factory=list)
    elapsed_s: float = 0.0
    label: str = ""

    @property
    def final_val_loss(self) -> float | None:
        return self.val_loss[-1] if self.val_loss else None

    @property
    def median_tokens_per_s(self) -> float:
        tps = sorted(self.tokens_per_s[1:] or self.tokens_per_s)  # the first step pays warm-up costs
        return tps[len(tps) // 2] if tps else float("nan")

    def plot(self, ax=None, label: str | None = None):
        import matplotlib.pyplot as plt
        ax = ax or plt.subplots(figsize=(6, 3.5))[1]
        name = label or self.label or "run"
        line, = ax.plot(self.steps, self.train_loss, alpha=0.6, lw=1, label=f"{name} train")
        if self.val_loss:
            ax.plot(self.val_steps, self.val_loss, "o-", color=line.get_color(), label=f"{name} validation")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        return ax

    def __repr__(self):
        if not self.steps:
            return "History(empty)"
        mfu = self.mfu[-1]
        return (f"History({self.label + ': ' if self.label else ''}{len(self.steps)} steps in {self.elapsed_s:.1f} s, "
                f"train loss {self.train_loss[0]:.3f} -> {self.train_loss[-1]:.3f}, "
                f"val loss {self.final_val_loss if self.final_val_loss is not None else float('nan'):.3f}, "
                f"{self.median_tokens_per_s:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'})")


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch_fn: Callable[[str], Batch], iters: int = 10,
             split: str = "val", autocast_dtype: torch.dtype | None = None) -> float:
    """Mean loss over `iters` batches of `split`, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(iters):
        with _autocast(model, autocast_dtype):
            losses.append(model(*batch_fn(split))[1].item())
    model.train(was_training)
    return sum(losses) / len(losses)


def _autocast(model, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_model_device(model).type, dtype=dtype)


def train(model: torch.nn.Module, batch_fn: Callable[[str], Batch], cfg: TrainConfig,
          label: str = "") -> History:
    """Train in place; returns the History. batch_fn(split) -> (x, y) or (x, y, attn_mask)."""
    torch.manual_seed(cfg.seed)
    device = _model_device(model)
    opt = make_optimizer(model, cfg)
    hist = History(label=label)
    peak = peak_flops(device)
    flops_per_token = getattr(model, "flops_per_token", None)
    model.train()
    bar = tqdm(range(cfg.max_steps), disable=not cfg.progress, desc=label or "train", unit="step")
    start = time.perf_counter()
    for step in bar:
        if step % cfg.eval_interval == 0 or step == cfg.max_steps - 1:
            hist.val_steps.append(step)
            hist.val_loss.append(evaluate(model, batch_fn, cfg.eval_iters, autocast_dtype=cfg.autocast_dtype))
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        tokens, loss_sum = 0, 0.0
        for _ in range(cfg.grad_accum):
            batch = batch_fn("train")
            with _autocast(model, cfg.autocast_dtype):
                loss = model(*batch)[1] / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
            tokens += batch[0].numel()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = float(loss_sum)  # .item() is a CPU-GPU sync point: the step has finished here
        dt = time.perf_counter() - t0
        tps = tokens / dt
        mfu = (flops_per_token(batch[0].size(1)) * tps / peak) if (peak and flops_per_token) else None
        hist.steps.append(step)
        hist.train_loss.append(loss_value)
        hist.lr.append(lr)
        hist.tokens_per_s.append(tps)
        hist.mfu.append(mfu)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}")
    hist.elapsed_s = time.perf_counter() - start
    return hist
