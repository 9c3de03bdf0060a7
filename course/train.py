"""The one training loop: AdamW, linear warmup + cosine decay, clipping, accumulation, eval.

    hist = train(model, lambda split: data.batch(split, 16, 128), TrainConfig(max_steps=300))
    hist.plot()

It trains one process and every parallel layout alike, because parallel techniques are applied to
the model before the loop (`course.parallelize`), in PyTorch's style: a wrapped or sharded model
averages its gradients by the end of `loss.backward()` and offers `no_sync()` for accumulation (as
DistributedDataParallel and FSDP do), and builds its optimizer over whatever `model.parameters()`
are (ZeRO's shards included). The loop only asks the model for three optional things:
`no_sync()` (or FSDP2's `set_requires_gradient_sync`), `clip_grad_norm_(max_norm)` (sharded models
sum their shards' squares across ranks), `make_optimizer(cfg)` when it must build its own (a 3D
model's ZeRO-1) and, for the metrics, `flops_per_token` (looked up through wrappers' `.module`). Pass `comm` (a course.parallel.comm.Comm over the data-parallel ranks) to log
the loss averaged over them.

Everything a lesson needs to see is measured here and kept in a `History`: train and validation
loss, learning rate, gradient norm, tokens/s and model FLOPs utilisation (MFU, PaLM appendix B:
achieved model FLOP/s over the device's peak; only for GPUs in `course.costs.PEAK_FLOPS`).
A non-finite loss or gradient norm stops training with the step where it happened
(`TrainConfig.on_nonfinite="raise"`), or skips that update ("skip", counted in History.skipped).
`scaler`: a torch.amp.GradScaler for fp16 (loss scaling: Micikevicius et al. 2018, section 3.2;
the dynamic schedule is GradScaler's): the loss is multiplied by the scale before backward, gradients
are unscaled before hooks and clipping, and a step whose gradients overflowed is skipped (counted in
History.skipped) while the scale halves.
`hooks`: functions called as hook(event, state) with event "after_backward" (gradients averaged,
before clipping and the update), "before_update" (after clipping: `state.grad_norm` is known) and
"after_step"; state is a `StepState`. They let a user measure or log something without editing the
loop; a hook may also set `state.skip = True` before the update (that step's update is not applied,
as with on_nonfinite="skip") or change the optimizer's learning rate for this step (History.lr
records the rate the update used). `course.stability` builds monitoring and anomaly policies on this.
`resume`: a function resume(model, optimizer) -> (step, History) or None, called once after seeding
and building the optimizer; it restores a saved state (`course.checkpoint.Checkpointer.resume`) and
the loop continues at that step with that History.

Schedules (`TrainConfig.schedule`, `lr_at`): every one warms up linearly over warmup_steps, then
"cosine" (GPT-3, Brown et al. 2020 appendix B: cosine to 10% of the peak), "linear" decay to min_lr,
"constant", or "wsd" (warmup-stable-decay: constant, then a linear cooldown to min_lr over the last
`decay_fraction` of training; Hu et al. 2024, MiniCPM §4, whose own cooldown is exponential, and
Hägele et al. 2024 §3, whose linear cooldown this is: about 20% of training matches cosine).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .device import peak_flops
from .progress import progress_bar

Batch = tuple  # (x, y) or (x, y, attn_mask)
NONFINITE = ("raise", "skip")
SCHEDULES = ("cosine", "linear", "constant", "wsd")


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
    on_nonfinite: str = "raise"  # what a NaN/inf loss or gradient norm does: "raise" or "skip" the update
    no_sync: bool = True  # accumulate locally under the model's no_sync(); False syncs every micro-batch
    schedule: str = "cosine"  # learning-rate schedule after warmup: one of SCHEDULES
    decay_fraction: float = 0.2  # "wsd" only: the share of training spent in the final cooldown

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "block_size", "grad_accum", "eval_interval", "eval_iters"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("seed", self.seed, 0)
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"TrainConfig.warmup_steps ({self.warmup_steps}) is longer than training "
                             f"(max_steps={self.max_steps}); use warmup_steps <= max_steps")
        _check_number("lr", self.lr, low=0.0, strict=True)
        if self.min_lr is None:
            self.min_lr = self.lr / 10
        _check_number("min_lr", self.min_lr, low=0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must be <= lr ({self.lr}): the cosine decays to it")
        _check_number("weight_decay", self.weight_decay, low=0.0)
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in self.betas)):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.grad_clip is not None:
            _check_number("grad_clip", self.grad_clip, low=0.0, strict=True)
        if self.autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"TrainConfig.autocast_dtype must be None, torch.bfloat16 or torch.float16, "
                             f"got {self.autocast_dtype!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check_number("decay_fraction", self.decay_fraction, low=0.0, strict=True)
        if self.decay_fraction > 1.0:
            raise ValueError(f"TrainConfig.decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.on_nonfinite not in NONFINITE:
            raise ValueError(f"TrainConfig.on_nonfinite must be one of {NONFINITE}, got {self.on_nonfinite!r}")


def _check_int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"TrainConfig.{name} must be an integer >= {low}, got {value!r}")


def _check_number(name, value, low, strict=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(f"TrainConfig.{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cfg.schedule down to cfg.min_lr at cfg.max_steps (min_lr after it)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":  # stable until the cooldown starts, then linear to min_lr
        decay_start = max(cfg.warmup_steps, cfg.max_steps - round(cfg.decay_fraction * cfg.max_steps))
        progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - min(1.0, max(0.0, progress)) * (cfg.lr - cfg.min_lr)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.schedule == "linear":
        return cfg.lr - progress * (cfg.lr - cfg.min_lr)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over model.parameters() with weight decay on matrices only (not biases, LayerNorm gains).
    Sharded models keep their parameters' dims (ZeRO and FSDP2 cut along dim 0), so the rule holds."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("make_optimizer: the model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # foreach: one call per group instead of one per tensor. torch turns it on by itself only on CUDA; on
    # the CPU its kernels are the per-tensor ones, so the update is the same bit for bit (tests/test_train.py)
    # and a small model's step is faster (a 2-layer, 64-wide GPT's AdamW step: 3.9 ms -> 2.3 ms, 1 thread).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, foreach=True)


@dataclass(repr=False)
class History:
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    mfu: list[float | None] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # steps whose update was skipped (non-finite)
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


@dataclass
class StepState:
    """What a hook sees: the step, the model and optimizer, this step's loss and gradient norm, the History."""
    step: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: float
    grad_norm: float | None
    lr: float
    history: History
    skip: bool = False  # a hook sets it (after_backward / before_update) to skip this step's update


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP-style wrappers (`.module`)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _mean(value: float, comm, device) -> float:
    """value averaged over comm's ranks (one tiny all-reduce, not counted as model traffic)."""
    if comm is None or comm.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=comm.group)
    return t.item() / comm.world


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch_fn: Callable[[str], Batch], iters: int = 10,
             split: str = "val", autocast_dtype: torch.dtype | None = None, comm=None) -> float:
    """Mean loss over `iters` batches of `split`, in eval mode (no dropout); averaged over comm's ranks."""
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(iters):
        with _autocast(model, autocast_dtype):
            losses.append(model(*batch_fn(split))[1].item())
    model.train(was_training)
    return _mean(sum(losses) / len(losses), comm, _model_device(model))


def _autocast(model, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_model_device(model).type, dtype=dtype)


@contextlib.contextmanager
def no_sync(model: torch.nn.Module):
    """The model's no_sync() (DDP, course wrappers) or FSDP2's set_requires_gradient_sync(False)."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm_(model: torch.nn.Module, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is <= max_norm; returns the norm before clipping.
    Sharded models (course ZeRO) provide their own; torch's handles plain and FSDP2 (DTensor) models."""
    if hasattr(model, "clip_grad_norm_"):
        norm = model.clip_grad_norm_(max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def train(model: torch.nn.Module, batch_fn: Callable[[str], Batch], cfg: TrainConfig, label: str = "",
          optimizer: torch.optim.Optimizer | None = None, comm=None, hooks=(), resume=None,
          scaler=None) -> History:
    """Train in place; returns the History. batch_fn(split) -> (x, y) or (x, y, attn_mask).
    resume(model, optimizer) -> (step, History) | None: continue a saved run (see the module docstring).
    scaler: a torch.amp.GradScaler for fp16 loss scaling (see the module docstring)."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    torch.manual_seed(cfg.seed)
    device = _model_device(model)
    if optimizer is None:  # a model may bring its own (a 3D model's ZeRO-1 over its data ranks)
        optimizer = model.make_optimizer(cfg) if hasattr(model, "make_optimizer") else make_optimizer(model, cfg)
    opt = optimizer
    hist, first = History(label=label), 0
    if resume is not None and (found := resume(model, opt)) is not None:
        first, hist = found  # model, optimizer, generators and data position restored by resume
    peak = peak_flops(device)
    flops_per_token = getattr(unwrap(model), "flops_per_token", None)
    model.train()
    bar = progress_bar(range(first, cfg.max_steps), desc=label or "train", enabled=cfg.progress, unit="step")
    start = time.perf_counter()
    for step in bar:
        if step % cfg.eval_interval == 0 or step == cfg.max_steps - 1:
            hist.val_steps.append(step)
            hist.val_loss.append(evaluate(model, batch_fn, cfg.eval_iters, autocast_dtype=cfg.autocast_dtype,
                                          comm=comm))
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        t0 = time.perf_counter()
        tokens, loss_sum = 0, 0.0
        for micro in range(cfg.grad_accum):
            batch = batch_fn("train")
            last = micro == cfg.grad_accum - 1
            with no_sync(model) if cfg.no_sync and not last else contextlib.nullcontext():
                with _autocast(model, cfg.autocast_dtype):
                    loss = model(*batch)[1] / cfg.grad_accum  # mean over micro-batches = mean over the batch
                (loss if scaler is None else scaler.scale(loss)).backward()
            loss_sum += loss.detach()
            tokens += batch[0].numel()
        loss_value = _mean(float(loss_sum), comm, device)  # .item() is a CPU-GPU sync point
        if scaler is not None:
            scaler.unscale_(opt)  # true gradients for hooks and clipping; records an overflow
        state = StepState(step, model, opt, loss_value, None, lr, hist)
        for hook in hooks:
            hook("after_backward", state)
        state.grad_norm = clip_grad_norm_(model, cfg.grad_clip if cfg.grad_clip is not None else math.inf)
        for hook in hooks:
            hook("before_update", state)
        if state.skip:  # a hook's policy (course.stability): no update, optimizer state untouched
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # closes this step's unscale_ (the scale follows what unscale_ found)
            hist.skipped.append(step)
        elif not (math.isfinite(loss_value) and math.isfinite(state.grad_norm)):
            opt.zero_grad(set_to_none=True)
            overflow = scaler is not None and math.isfinite(loss_value)  # scaled gradients overflowed
            if scaler is not None:
                scaler.update()  # found an inf: the scale is lowered
            if cfg.on_nonfinite == "raise" and not overflow:
                raise FloatingPointError(f"non-finite training loss {loss_value} or gradient norm {state.grad_norm} "
                                         f"at step {step}{f' ({label})' if label else ''}: the update was not "
                                         f"applied; lower lr, check the data, or set on_nonfinite='skip'")
            hist.skipped.append(step)
        else:
            if scaler is None:
                opt.step()
            else:
                scaler.step(opt)  # the gradients are finite: a plain step (unscaled above)
                scaler.update()  # the scale grows after growth_interval clean steps
            opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        tps = tokens / dt
        mfu = (flops_per_token(batch[0].size(1)) * tps / peak) if (peak and flops_per_token) else None
        hist.steps.append(step)
        hist.train_loss.append(loss_value)
        hist.lr.append(opt.param_groups[0]["lr"])  # the rate the update used (a hook may have changed it)
        hist.grad_norm.append(state.grad_norm)
        hist.tokens_per_s.append(tps)
        hist.mfu.append(mfu)
        for hook in hooks:
            hook("after_step", state)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
    bar.close()
    hist.elapsed_s += time.perf_counter() - start
    return hist
