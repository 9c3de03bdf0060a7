"""Monitoring through the loop's hooks: a metrics history and a dashboard, without editing the loop.

    mon = Monitor(model)                                  # loss, grad norm, lr, update/weight ratio,
    mon.add("logit_max", lambda state: ...)               # per-block activation std; add your own
    hist = train(model, batch_fn, cfg, hooks=[mon])
    mon.dashboard(hist)                                   # one figure, a panel per quantity

What each number tells (and where the rule of thumb comes from):
- loss and gradient norm: spikes in the gradient norm often come with, or before, loss spikes
  (PaLM, Chowdhery et al. 2022 §5.1, saw spikes "despite the fact that gradient clipping was enabled").
- update/weight ratio ||ΔW|| / ||W|| per step: how fast the weights move relative to their size;
  "a rough heuristic is that this ratio should be somewhere around 1e-3" (Karpathy, CS231n notes,
  "Neural Networks Part 3", ratio of weights:updates). Far larger means the learning rate is too high.
- per-block activation std of the residual stream (course.stability.init.LayerStats): grows when
  training becomes unstable.
- tokens/s and MFU come from the loop's History (MFU only where a peak is known: PaLM appendix B).

A metric is a function of the loop's StepState returning a number, recorded after every step.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .init import LayerStats


class Monitor:
    """A hook: hooks=[Monitor(model)]. `metrics[name]` is a list aligned with `steps`."""

    def __init__(self, model: torch.nn.Module, layer_stats: bool = True):
        self.model = model
        self.steps: list[int] = []
        self.metrics: dict[str, list[float]] = {"update_ratio": []}
        self._extra: dict[str, Callable] = {}
        self._before: list[torch.Tensor] | None = None
        self._layers = LayerStats(model) if layer_stats and hasattr(model, "blocks") else None
        if self._layers is not None:
            self._layers.__enter__()
            for i in range(len(self._layers.blocks)):
                self.metrics[f"act_std/{i}"] = []
        self.events: list[tuple[int, str]] = []  # (step, what): anomalies and actions, drawn on the dashboard

    def add(self, name: str, fn: Callable) -> "Monitor":
        """Record fn(state) -> float after every step under `name`."""
        if not isinstance(name, str) or not name or name in self.metrics:
            raise ValueError(f"metric name must be a new non-empty string, got {name!r} (have {sorted(self.metrics)})")
        if not callable(fn):
            raise ValueError(f"metric {name!r}: fn must be callable as fn(state) -> float")
        self._extra[name] = fn
        self.metrics[name] = []
        return self

    def note(self, step: int, what: str):
        self.events.append((step, what))

    def _params(self):
        return [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]

    def __call__(self, event, state):
        if event == "before_update":
            self._before = [p.detach().clone() for p in self._params()]
        elif event == "after_step":
            self.steps.append(state.step)
            ratio = math.nan
            if self._before is not None and not state.skip:  # a skipped (or rolled-back) step made no update
                params = self._params()
                delta = math.sqrt(sum((p.detach() - b).float().square().sum().item() for p, b in zip(params, self._before)))
                norm = math.sqrt(sum(b.float().square().sum().item() for b in self._before))
                ratio = delta / norm if norm > 0 else math.nan
            self._before = None
            self.metrics["update_ratio"].append(ratio)
            if self._layers is not None:
                for i, v in enumerate(self._layers.act_std):
                    self.metrics[f"act_std/{i}"].append(v)
            for name, fn in self._extra.items():
                self.metrics[name].append(float(fn(state)))

    def close(self):
        if self._layers is not None:
            self._layers.close()

    def dashboard(self, hist, title: str = ""):
        """Loss, gradient norm, learning rate, update/weight ratio, activations, throughput: one figure."""
        import matplotlib.pyplot as plt
        extra = list(self._extra)
        n = 6 + len(extra)
        cols = 3
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(13, 3.1 * ((n + cols - 1) // cols)))
        axes = axes.ravel()
        ax = axes[0]
        ax.plot(hist.steps, hist.train_loss, lw=1, label="train")
        if hist.val_loss:
            ax.plot(hist.val_steps, hist.val_loss, "o-", ms=3, label="validation")
        ax.set(ylabel="loss (nats / token)", title="loss")
        ax = axes[1]
        ax.semilogy(hist.steps, [g if math.isfinite(g) else math.nan for g in hist.grad_norm], lw=1, label="before clipping")
        ax.set(ylabel="global L2 norm", title="gradient norm")
        axes[2].semilogy(hist.steps, hist.lr, lw=1, label="lr used")
        axes[2].set(ylabel="learning rate", title="learning rate")
        axes[3].semilogy(self.steps, self.metrics["update_ratio"], lw=1, label="||ΔW|| / ||W||")
        axes[3].axhline(1e-3, color="gray", ls=":", label="1e-3 (CS231n heuristic)")
        axes[3].set(ylabel="ratio", title="update / weight (matrices)")
        blocks = [k for k in self.metrics if k.startswith("act_std/")]
        for k in blocks:
            axes[4].plot(self.steps, self.metrics[k], lw=1, label=f"block {k.split('/')[1]}")
        axes[4].set(ylabel="std of block output", title="residual-stream activations")
        axes[5].plot(hist.steps, hist.tokens_per_s, lw=1, label="tokens/s")
        mfu = [m for m in hist.mfu if m is not None]
        axes[5].set(ylabel="tokens / s", title=f"throughput{'' if not mfu else f', MFU {mfu[-1]:.1%}'}")
        for i, name in enumerate(extra):
            axes[6 + i].plot(self.steps, self.metrics[name], lw=1, label=name)
            axes[6 + i].set(ylabel=name, title=name)
        for ax in axes[:n]:
            for step, what in self.events:
                ax.axvline(step, color="red", alpha=0.35, lw=1)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in axes[n:]:
            ax.axis("off")
        if self.events:
            fig.suptitle((title + ": " if title else "") + "red lines = " +
                         "; ".join(f"step {s} {w}" for s, w in self.events[:6]), fontsize=9)
        elif title:
            fig.suptitle(title)
        fig.tight_layout()
        return fig
