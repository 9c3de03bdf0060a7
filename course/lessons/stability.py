"""Lesson 09's experiments and figures: every configuration run over seeds with course.stability.

    s = Setup.from_profile(profile())
    stats = compare({"lr 1e-3": lambda seed: s.run(seed, lr=1e-3)}, seeds=(0, 1, 2))

`Setup.run(seed, ...)` builds the small course Transformer, trains it with the one loop
(course.train.train) and returns {"val": final validation loss, "train": last training loss,
"seconds": wall time}; keyword arguments go to the model (dropout), the TrainConfig (lr, schedule,
weight_decay, grad_accum, ...), the batch (batch_size), the data (a TextData) and the hooks.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace

import torch

from ..data import TextData, load_dataset
from ..model import ModelConfig, Transformer
from ..stability import init_weights
from ..train import TrainConfig, train

MODEL_KEYS = {f.name for f in fields(ModelConfig)}
CONFIG_KEYS = {f.name for f in fields(TrainConfig)}


@dataclass
class Setup:
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    block_size: int = 32
    batch_size: int = 16
    steps: int = 50
    lr: float = 3e-3
    warmup_steps: int = 5
    eval_iters: int = 8
    device: str = "cpu"

    @classmethod
    def from_profile(cls, prof) -> "Setup":
        if prof.name == "gpu":
            return cls(n_layer=4, n_embd=256, block_size=128, batch_size=32, steps=300, device=str(prof.device))
        if prof.name == "smoke":
            return cls(n_layer=prof.n_layer, n_embd=prof.n_embd, steps=prof.max_steps, eval_iters=2,
                       device=str(prof.device))
        return cls(device=str(prof.device))

    def replace(self, **kw) -> "Setup":
        return replace(self, **kw)

    @property
    def data(self) -> TextData:
        return load_dataset("char")

    def model(self, seed: int, init: str | None = None, **model_kw) -> Transformer:
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=self.data.tokenizer.vocab_size, block_size=self.block_size, n_layer=self.n_layer,
                          n_head=self.n_head, n_embd=self.n_embd, **model_kw)
        model = Transformer(cfg)
        if init is not None:
            init_weights(model, init, seed=seed)
        return model.to(self.device)

    def config(self, **kw) -> TrainConfig:
        base = dict(max_steps=self.steps, lr=self.lr, warmup_steps=self.warmup_steps, eval_interval=self.steps,
                    eval_iters=self.eval_iters, progress=False)
        return TrainConfig(**{**base, **kw})

    def batch_fn(self, seed: int, data: TextData | None = None, batch_size: int | None = None):
        data = data or self.data
        g = torch.Generator().manual_seed(1000 + seed)
        bs = batch_size or self.batch_size
        return lambda split: data.batch(split, bs, self.block_size, g, device=self.device)

    def run(self, seed: int, init: str | None = None, data: TextData | None = None, batch_size: int | None = None,
            hooks=(), history: bool = False, **kw):
        unknown = set(kw) - MODEL_KEYS - CONFIG_KEYS
        if unknown:
            raise ValueError(f"Setup.run: unknown settings {sorted(unknown)}")
        model = self.model(seed, init, **{k: v for k, v in kw.items() if k in MODEL_KEYS})
        cfg = self.config(**{k: v for k, v in kw.items() if k in CONFIG_KEYS}, seed=seed)
        t0 = time.perf_counter()
        hist = train(model, self.batch_fn(seed, data, batch_size), cfg, hooks=list(hooks))
        out = {"val": hist.final_val_loss, "train": hist.train_loss[-1], "seconds": time.perf_counter() - t0}
        return (out, hist) if history else out


def tiny_data(n_tokens: int) -> TextData:
    """The corpus with only its first n_tokens training tokens (validation unchanged): a set to overfit."""
    d = load_dataset("char")
    return TextData(d.train[:n_tokens].clone(), d.val, d.tokenizer, d.source + f"[:{n_tokens}]")


def _finite(v):
    return v if math.isfinite(v) else math.nan


def plot_stats(stats: dict, ax=None, metric: str = "val", ylabel="final validation loss (nats / token)", title=""):
    """One point per configuration: the mean over seeds, its 95% confidence interval, and every seed."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(7, 3.4))[1]
    names = list(stats)
    for i, name in enumerate(names):
        s = stats[name][metric] if isinstance(stats[name], dict) else stats[name]
        ax.errorbar([i], [_finite(s.mean)], yerr=[[_finite(s.half_width)]], fmt="o", capsize=5, color="C0",
                    label="mean ± 95% CI" if i == 0 else None)
        ax.plot([i] * s.n, [_finite(v) for v in s.values], "x", color="C1", alpha=0.7, label="each seed" if i == 0 else None)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_layer_stats(by_scheme: dict, axes=None):
    """Per block: std of the residual stream and the gradient norm into it, one line per init scheme."""
    import matplotlib.pyplot as plt
    axes = axes if axes is not None else plt.subplots(1, 2, figsize=(11, 3.4))[1]
    for name, st in by_scheme.items():
        blocks = range(len(st.act_std))
        axes[0].semilogy(blocks, st.act_std, "o-", label=name)
        axes[1].semilogy(blocks, st.grad_norm, "o-", label=name)
    axes[0].set(xlabel="block", ylabel="std of block output", title="activations at initialization")
    axes[1].set(xlabel="block", ylabel="L2 norm of dLoss/d(block output)", title="gradients at initialization")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return axes


def plot_curves(hists_by_name: dict, ax=None, val=True):
    """Mean training (and validation) curve over seeds per configuration, with a band of ± one std."""
    import matplotlib.pyplot as plt
    import numpy as np
    ax = ax or plt.subplots(figsize=(7, 3.6))[1]
    for i, (name, hists) in enumerate(hists_by_name.items()):
        color = f"C{i}"
        tr = np.array([h.train_loss for h in hists])
        ax.plot(hists[0].steps, tr.mean(0), color=color, lw=1, alpha=0.8, label=f"{name}: train")
        ax.fill_between(hists[0].steps, tr.mean(0) - tr.std(0), tr.mean(0) + tr.std(0), color=color, alpha=0.15)
        if val and hists[0].val_loss:
            va = np.array([h.val_loss for h in hists])
            ax.errorbar(hists[0].val_steps, va.mean(0), yerr=va.std(0), fmt="o--", color=color, ms=4, capsize=3,
                        label=f"{name}: validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return ax


def stats_table(stats: dict, metrics=("val",)) -> str:
    """Markdown table: configuration, then mean ± CI half-width (std) for each metric."""
    head = "| configuration | " + " | ".join(f"{m} (mean ± 95% CI, std)" for m in metrics) + " |"
    rows = [head, "|---" * (len(metrics) + 1) + "|"]
    for name, s in stats.items():
        cells = [f"{s[m].mean:.3f} ± {s[m].half_width:.3f} ({s[m].std:.3f})" for m in metrics]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
