"""Hyperparameter tools on the one loop: the learning-rate range test, and gradient-noise injection.

    rt = lr_range_test(model, batch_fn, lr_min=1e-5, lr_max=1.0, steps=100)
    rt.plot(); rt.steepest, rt.lr_min_loss

Learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", §3.3):
train once while the learning rate rises from lr_min to lr_max, and read the bounds off the loss
curve: the loss starts to fall at the lower bound and stops falling, turns ragged or rises at the
upper one. Smith raises the rate linearly; over five decades a geometric ramp (equal steps in
log lr, as fastai's `lr_find` does) gives every decade the same number of steps, so this ramp is
geometric by default (`ramp="linear"` gives Smith's). The curve is smoothed with a bias-corrected
exponential moving average before reading it. `steepest` is the rate where the smoothed loss falls
fastest per decade, `lr_min_loss` the one at its minimum (the edge of divergence lies just beyond).

Gradient noise (Neelakantan et al. 2015, "Adding Gradient Noise Improves Learning for Very Deep
Networks", §2): add N(0, σ_t²) to every gradient, σ_t² = η / (1 + t)^γ with γ = 0.55 (the paper's
value), as a hook after backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..train import TrainConfig, train


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]
    smoothed: list[float]

    @property
    def lr_min_loss(self) -> float:
        finite = [(s, lr) for s, lr in zip(self.smoothed, self.lrs) if math.isfinite(s)]
        return min(finite)[1]

    @property
    def steepest(self) -> float:
        """The rate where d(smoothed loss)/d(log10 lr) is most negative, before the minimum."""
        end = self.lrs.index(self.lr_min_loss)
        best, at = math.inf, self.lrs[0]
        for i in range(1, end + 1):
            slope = (self.smoothed[i] - self.smoothed[i - 1]) / (math.log10(self.lrs[i]) - math.log10(self.lrs[i - 1]))
            if slope < best:
                best, at = slope, self.lrs[i]
        return at

    def plot(self, ax=None, label="range test"):
        import matplotlib.pyplot as plt
        ax = ax or plt.subplots(figsize=(6, 3.5))[1]
        ax.semilogx(self.lrs, self.losses, alpha=0.3, lw=1, label=f"{label}: per step")
        ax.semilogx(self.lrs, self.smoothed, lw=2, label=f"{label}: smoothed")
        ax.axvline(self.steepest, color="green", ls="--", label=f"steepest descent {self.steepest:.1e}")
        ax.axvline(self.lr_min_loss, color="red", ls=":", label=f"minimum {self.lr_min_loss:.1e}")
        ax.set(xlabel="learning rate (log scale)", ylabel="training loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return ax


def range_lrs(lr_min: float, lr_max: float, steps: int, ramp: str = "geometric") -> list[float]:
    for name, v in (("lr_min", lr_min), ("lr_max", lr_max)):
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if lr_min >= lr_max:
        raise ValueError(f"lr_min ({lr_min}) must be < lr_max ({lr_max})")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise ValueError(f"steps must be an integer >= 2, got {steps!r}")
    if ramp not in ("geometric", "linear"):
        raise ValueError(f"ramp must be 'geometric' or 'linear', got {ramp!r}")
    if ramp == "linear":
        return [lr_min + (lr_max - lr_min) * i / (steps - 1) for i in range(steps)]
    return [lr_min * (lr_max / lr_min) ** (i / (steps - 1)) for i in range(steps)]


def lr_range_test(model: torch.nn.Module, batch_fn, lr_min: float = 1e-5, lr_max: float = 1.0, steps: int = 100,
                  ramp: str = "geometric", beta: float = 0.9, cfg: TrainConfig | None = None) -> RangeTest:
    """Train `model` in place for `steps` steps with the rate ramped from lr_min to lr_max (through the
    loop's hooks: the loop is unchanged); non-finite steps are skipped. Returns the RangeTest."""
    lrs = range_lrs(lr_min, lr_max, steps, ramp)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta (smoothing) must be in [0, 1), got {beta!r}")
    base = cfg or TrainConfig()
    run_cfg = TrainConfig(**{**base.__dict__, "max_steps": steps, "warmup_steps": 0, "lr": lr_max, "min_lr": lr_max,
                             "schedule": "constant", "eval_interval": steps, "eval_iters": 1, "on_nonfinite": "skip"})

    def ramp_hook(event, state):
        if event == "before_update":
            for group in state.optimizer.param_groups:
                group["lr"] = lrs[state.step]

    hist = train(model, batch_fn, run_cfg, label="lr range test", hooks=[ramp_hook])
    smoothed, avg = [], 0.0
    for i, loss in enumerate(hist.train_loss):
        avg = beta * avg + (1 - beta) * (loss if math.isfinite(loss) else avg)
        smoothed.append(avg / (1 - beta ** (i + 1)) if math.isfinite(loss) else math.nan)
    return RangeTest(lrs, hist.train_loss, smoothed)


class GradientNoise:
    """Hook: after backward, add N(0, eta / (1 + t)^gamma) to every gradient (Neelakantan et al. 2015)."""

    def __init__(self, eta: float = 0.01, gamma: float = 0.55, seed: int = 0):
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        self.eta, self.gamma = float(eta), float(gamma)
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, event, state):
        if event != "after_backward" or self.eta == 0:
            return
        std = math.sqrt(self.eta / (1 + state.step) ** self.gamma)
        for p in state.model.parameters():
            if p.grad is not None:
                noise = torch.randn(p.grad.shape, generator=self.gen, dtype=p.grad.dtype)
                p.grad.add_(noise.to(p.grad.device), alpha=std)
