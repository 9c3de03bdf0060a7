"""Initialization schemes applied from outside the model, and per-layer statistics collected by hooks.

    init_weights(model, "gpt2", seed=0)      # or "pytorch", "unscaled", "large"
    with LayerStats(model) as stats:         # forward hooks on each block, tensor hooks for gradients
        model(x, y)[1].backward()
    stats.table()                            # per block: activation std, gradient norm

Schemes (`INIT_SCHEMES`):
- "pytorch": every module's own `reset_parameters()` (nn.Linear: Kaiming-uniform with a = sqrt(5),
  i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)); nn.Embedding: N(0, 1); LayerNorm: ones and zeros). The
  token embedding is tied to the output head, so it ends with the head's Linear init (reset last).
- "gpt2": N(0, 0.02) for every weight matrix and embedding, zero biases, and the residual output
  projections (`c_proj`) scaled by 1/sqrt(2·n_layer): "we scale the weights of residual layers at
  initialization by a factor of 1/sqrt(N) where N is the number of residual layers" (Radford et al.
  2019, GPT-2, §2.3); each block has two residual branches, hence 2·n_layer. This is what
  `course.model.Transformer` does by itself.
- "unscaled": N(0, 0.02) everywhere, without the residual scaling (the variance of the residual
  stream then grows about linearly with depth, since each block adds an independent branch).
- "large": N(0, 1) for every weight: a deliberately bad scheme. Pre-activations are ~sqrt(fan_in)
  times too large, the softmaxes saturate and the logits are huge at step 0.

LayerStats records, per block, the standard deviation of the block's output (the residual stream),
and the L2 norm of the gradient flowing into it (a tensor hook on the output), the two quantities
whose growth or decay with depth tells a good initialization from a bad one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..model import Transformer

INIT_SCHEMES = ("pytorch", "gpt2", "unscaled", "large")


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, seed: int | None = None) -> nn.Module:
    """Re-initialise every parameter of a course Transformer by `scheme`; returns the model."""
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init scheme must be one of {INIT_SCHEMES}, got {scheme!r}")
    if not isinstance(model, Transformer):
        raise ValueError(f"init_weights needs a course.model.Transformer, got {type(model).__name__}")
    if seed is not None:
        torch.manual_seed(seed)
    if scheme == "pytorch":
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
        return model
    std = 1.0 if scheme == "large" else 0.02
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            m.reset_parameters()
    if scheme == "gpt2":
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * model.config.n_layer))
    return model


class LayerStats:
    """Forward hooks on model.blocks: per block, the output's std and the gradient norm into it.

    Inside `with LayerStats(model) as s:` every forward in training mode records; s.act_std[i] and
    s.grad_norm[i] hold the latest values for block i (grad_norm after backward).
    """

    def __init__(self, model: nn.Module):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError("LayerStats needs a model with a non-empty `blocks` ModuleList (course Transformer)")
        self.blocks = list(blocks)
        self.act_std = [math.nan] * len(self.blocks)
        self.act_rms = [math.nan] * len(self.blocks)
        self.grad_norm = [math.nan] * len(self.blocks)
        self._handles = []

    def _hook(self, i):
        def hook(module, args, out):  # out: (B, T, C)
            if not module.training:
                return
            self.act_std[i] = out.detach().float().std().item()
            self.act_rms[i] = out.detach().float().square().mean().sqrt().item()
            if out.requires_grad:
                out.register_hook(lambda g: self._grad(i, g))
        return hook

    def _grad(self, i, g):
        self.grad_norm[i] = g.detach().float().norm().item()

    def __enter__(self):
        self._handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for h in self._handles:
            h.remove()
        self._handles = []

    def table(self) -> list[dict]:
        return [{"block": i, "act_std": a, "grad_norm": g} for i, (a, g) in enumerate(zip(self.act_std, self.grad_norm))]


def layer_stats_at_init(model: nn.Module, batch) -> LayerStats:
    """One forward and backward of `batch` (x, y) in training mode; the per-block statistics."""
    was = model.training
    model.train()
    with LayerStats(model) as stats:
        model(*batch)[1].backward()
    model.zero_grad(set_to_none=True)
    model.train(was)
    return stats
