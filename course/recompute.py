"""Activation checkpointing: trade recomputation for memory, applied to an unchanged model.

Backward needs tensors from the forward pass (what autograd saves: `course.measure.saved_tensors`).
A checkpointed segment keeps only its input and recomputes everything inside it during backward
(`torch.utils.checkpoint`, always `use_reentrant=False`), at the price of one extra forward of
that segment. Policies, for a model with n blocks:

- none:      keep everything.                                  memory ~ n layers,   extra ~ 0
- full:      checkpoint every block (Megatron "full").         memory ~ n inputs + 1 layer, extra ~ 1 forward
- every-k:   checkpoint blocks 0, k, 2k, ...                   a knob between none (k > n) and full (k = 1)
- sqrt:      ceil(sqrt n) blocks per segment (Chen et al. 2016, "Training deep nets with sublinear
             memory cost"): n/m segment inputs + m layers while one segment is recomputed, minimised
             at m = sqrt n, i.e. ~2 sqrt(n) layer-units of memory for one extra forward.
- selective: op-level selective recomputation (torchtitan's "op" SAC) over every block: keep the
             outputs of the expensive ops (the linear layers' matmuls and the fused attention kernel),
             recompute the cheap ones (LayerNorm, GELU, softmax, dropout, residual adds, and the
             attention core's own matmuls when attention is written out). Built on
             `create_selective_checkpoint_contexts`: on CPU the fused attention op is
             aten._scaled_dot_product_flash_attention_for_cpu, on CUDA one of
             aten._scaled_dot_product_{flash,efficient,cudnn}_attention.
- core-attention: Korthikanti et al. 2022 ("Reducing activation recomputation in large transformer
             models"), Megatron's `--recompute-granularity selective`: the same op policy, applied only
             to each block's attention core (QK^T, mask, softmax, dropout, attention over V). That is
             where the s*s tensors live (5as/h of the paper's 34 + 5as/h bytes per sbh), and nothing
             else is recomputed. A fused kernel (SDPA) keeps no s*s tensor; its output is kept, so under
             fused attention this policy changes nothing, which is why FlashAttention-era training
             rarely needs it.
- flash:     every attention core swapped for `course.flash.FlashAttention` (FlashAttention-2, Dao 2023),
             which keeps q, k, v, its output and one log-sum-exp per row and recomputes the s*s score
             tiles inside its own backward: Korthikanti's selective recomputation done by the kernel,
             with dropout masks regenerated from a seed. Block-sparse cores keep their pattern.

How it plugs in: `apply_policy(model, "sqrt")` sets `model.runner` (the model's one seam for
running its blocks) to a `SegmentRunner`, which runs the same Block objects segment by segment and
wraps the checkpointed segments; `model.blocks`, parameter names and the state_dict are unchanged
(a checkpointed model loads the same weights, and sharding applied afterwards still sees every
block). "core-attention" instead wraps each attention core in a `RecomputedCore`, "flash" in a
`FlashCore` (cores hold no parameters). `remove_policy(model)` puts the plain runner and the original cores back.
`plan(...)` at the end is the analytic planner (formulas from `course.costs`).

Dropout: checkpoint saves and restores the RNG state (preserve_rng_state=True), so recomputed
dropout masks equal the forward ones and gradients match no checkpointing exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .costs import (core_attention_layer_bytes, flash_layer_bytes, layer_activation_bytes, model_state_bytes,
                    selective_layer_bytes)
from .model import attention_layers, run_blocks

POLICIES = ("none", "full", "every-k", "sqrt", "selective", "core-attention", "flash")

_aten = torch.ops.aten
# Outputs kept by the selective policy: matmuls of the linear layers and every fused attention kernel.
SAVE_OPS = [
    _aten.mm.default,
    _aten.addmm.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,  # CPU
    _aten._scaled_dot_product_flash_attention.default,  # CUDA, 16-bit
    _aten._scaled_dot_product_efficient_attention.default,  # CUDA, fp32 / masks
    _aten._scaled_dot_product_cudnn_attention.default,  # CUDA, cuDNN backend
]


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """context_fn for `checkpoint`: save SAVE_OPS outputs, recompute everything else."""
    return create_selective_checkpoint_contexts(_selective_policy)


def segments_for(policy: str, n: int, k: int | None = None) -> list[tuple[int, int, bool]]:
    """The policy as (start, stop, checkpointed) block ranges covering 0..n-1."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy == "every-k":
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
            raise ValueError(f"k must be an integer with 1 <= k <= n_layer={n} for policy 'every-k', got {k!r}")
        return [(i, i + 1, i % k == 0) for i in range(n)]
    if k is not None:
        raise ValueError(f"k is only used by policy 'every-k', got k={k!r} with policy {policy!r}")
    if policy == "sqrt":
        m = math.ceil(math.sqrt(n))  # blocks per segment
        return [(i, min(i + m, n), True) for i in range(0, n, m)]
    return [(i, i + 1, policy in ("full", "selective")) for i in range(n)]  # core-attention, flash: inside blocks


def _run_range(blocks, start: int, stop: int, x, attn_mask=None):
    for i in range(start, stop):
        x = blocks[i](x, attn_mask)
    return x  # (B, T, C)


class SegmentRunner:
    """`model.runner` for a recomputation policy: runs the blocks segment by segment and wraps the
    checkpointed segments in `torch.utils.checkpoint` (the blocks themselves are untouched)."""

    def __init__(self, segments, selective: bool = False, policy: str = "none"):
        self.segments = list(segments)
        self.selective = selective
        self.policy = policy

    def __call__(self, blocks, x, attn_mask=None):
        if self.segments[-1][1] != len(blocks):
            raise ValueError(f"recomputation policy {self.policy!r} was planned for {self.segments[-1][1]} blocks, "
                             f"the model now has {len(blocks)}: apply the policy again")
        kw = {"context_fn": selective_context} if self.selective else {}
        for start, stop, ckpt in self.segments:
            if ckpt and torch.is_grad_enabled():  # eval / generate: nothing to save, nothing to recompute
                x = checkpoint(_run_range, blocks, start, stop, x, attn_mask, use_reentrant=False, **kw)
            else:
                x = _run_range(blocks, start, stop, x, attn_mask)
        return x  # (B, T, C)

    def __repr__(self) -> str:
        desc = ", ".join(f"{a}-{b - 1}{'*' if c else ''}" for a, b, c in self.segments)
        return f"SegmentRunner(policy={self.policy!r}, segments [{desc}], * = recomputed)"


class RecomputedCore(nn.Module):
    """A block's attention core, checkpointed with the selective op policy (policy "core-attention")."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        if not torch.is_grad_enabled():
            return self.core(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)
        # kept: q, k, v (views of c_attn's output, which the none policy keeps too) and the fused
        # kernel's output if there is one; recomputed in backward: everything else in the core
        return checkpoint(self.core, q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p,
                          use_reentrant=False, context_fn=selective_context)  # (B, nh, T, hs)


class FlashCore(nn.Module):
    """A block's attention core computed by the flash kernel (policy "flash"); `replaced` is put back."""

    def __init__(self, core: nn.Module):
        super().__init__()
        from .flash import FlashAttention
        self.flash = FlashAttention.replacing(core)  # ValueError for a core it has no equivalent of
        self.replaced = core

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        return self.flash(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, nh, T, hs)


def apply_policy(model: nn.Module, policy: str, k: int | None = None) -> nn.Module:
    """Give `model` (a course.model.Transformer) a recomputation policy, in place. Returns the model.

    Segment policies install a `SegmentRunner` as `model.runner`; "core-attention" wraps every
    attention core in a `RecomputedCore`. `model.blocks` and the state_dict stay as they are, so
    sharding applied afterwards (ZeRO-3, FSDP2) still finds every block."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0 or not hasattr(model, "runner"):
        raise ValueError("apply_policy needs a course.model.Transformer (a non-empty nn.ModuleList `blocks` and "
                         f"a `runner` seam), got {type(model).__name__} with blocks={type(blocks).__name__}")
    segments = segments_for(policy, len(blocks), k)
    remove_policy(model)  # a new policy replaces the old one
    if policy == "core-attention":
        for layer in attention_layers(model):
            layer.core = RecomputedCore(layer.core)
    elif policy == "flash":
        for layer in attention_layers(model):
            layer.core = FlashCore(layer.core)
    elif policy != "none":
        model.runner = SegmentRunner(segments, policy == "selective", policy if policy != "every-k" else f"every-{k}")
    return model


def remove_policy(model: nn.Module) -> nn.Module:
    """Back to the plain runner and the model's own attention cores."""
    if isinstance(getattr(model, "runner", None), SegmentRunner):
        model.runner = run_blocks
    for layer in attention_layers(model):
        if isinstance(layer.core, RecomputedCore):
            layer.core = layer.core.core
        elif isinstance(layer.core, FlashCore):
            layer.core = layer.core.replaced
    return model


def policy_of(model: nn.Module) -> str:
    runner = getattr(model, "runner", None)
    if isinstance(runner, SegmentRunner):
        return runner.policy
    if any(isinstance(layer.core, RecomputedCore) for layer in attention_layers(model)):
        return "core-attention"
    if any(isinstance(layer.core, FlashCore) for layer in attention_layers(model)):
        return "flash"
    return "none"


# ----------------------------------------------------------------------------- the planner


def plan(n_layer: int, n_embd: int, n_head: int, seq_len: int, batch: int, policy: str = "none",
         k: int | None = None, bytes_per_el: int = 2, vocab: int = 50257, precision: str = "mixed",
         core: str = "sdpa", dropout: bool = False, device: str = "cuda") -> dict:
    """Memory and recompute cost of one GPT training step (analytic), for the planner widget.

    GiB of weights / gradients / optimizer state (`model_state_bytes`), activations kept after the
    forward pass and at the backward peak (what earlier segments keep + the segment in backward), and the extra
    compute as a fraction of a step (forward 24bsh² + 4bs²h per layer; a step is 3 forwards).
    full = every layer's forward again; every-k = 1/k of them; sqrt = all layers once (segments of
    ceil(sqrt L)); selective and core-attention = the attention core when it is written out (4bs²h per
    layer), else nothing (selective's pointwise ops are counted as 0); flash = the scores QK^T once more
    in backward (2bs²h per layer, Dao 2023 Algorithm 2), whatever `core` was.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    for name, v in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("seq_len", seq_len),
                    ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if policy == "every-k" and (not isinstance(k, int) or not 1 <= k <= n_layer):
        raise ValueError(f"k must be an integer with 1 <= k <= n_layer={n_layer} for 'every-k', got {k!r}")
    s, b, h, a, L = seq_len, batch, n_embd, n_head, n_layer
    kw = dict(bytes_per_el=bytes_per_el, core=core, dropout=dropout, device=device)
    layer = sum(layer_activation_bytes(s, b, h, a, **kw).values())
    if policy == "flash":  # the policy swaps the core: every layer keeps the flash kernel's bytes
        layer = sum(flash_layer_bytes(s, b, h, a, bytes_per_el=bytes_per_el, dropout=dropout, device=device).values())
    x = s * b * h * bytes_per_el  # a block's input: what a checkpoint keeps
    # walk the segments like backward does: while segment j runs backward, segments before it still hold
    # what they kept, and j holds its full activations (recomputed if it was checkpointed)
    sel = {"selective": selective_layer_bytes(s, b, h, a, **kw),
           "core-attention": core_attention_layer_bytes(s, b, h, a, **kw)}.get(policy)
    kept_parts, live_parts = [], []
    for start, stop, ckpt in segments_for(policy, L, k if policy == "every-k" else None):
        n = stop - start
        kept_parts.append(n * sel if sel is not None else (x if ckpt else n * layer))
        live_parts.append(n * layer)
    kept = sum(kept_parts)
    peak = max([kept] + [sum(kept_parts[:j]) + live_parts[j] for j in range(len(kept_parts))])
    n_ckpt = {"none": 0, "full": L, "every-k": math.ceil(L / (k or 1)), "sqrt": L}.get(policy, L)
    fwd_layer = 24 * b * s * h * h + 4 * b * s * s * h
    fused = core == "sdpa" and not (dropout and device == "cpu")
    if policy == "flash":
        extra = L * 2 * b * s * s * h / (3 * L * fwd_layer)
    elif sel is not None:
        extra = 0.0 if fused else L * 4 * b * s * s * h / (3 * L * fwd_layer)
    else:
        extra = n_ckpt * fwd_layer / (3 * L * fwd_layer)
    n_params = 12 * L * h * h + vocab * h
    ms = model_state_bytes(n_params, precision)
    states = {"weights": ms["params"] / 2**30, "gradients": ms["grads"] / 2**30, "optimizer state": ms["optimizer"] / 2**30}
    return {
        "params": n_params,
        **states,
        "activations kept": kept / 2**30,
        "activations peak": peak / 2**30,
        "total": sum(states.values()) + peak / 2**30,
        "extra compute": extra,
    }
