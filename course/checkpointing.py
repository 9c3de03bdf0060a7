"""Activation checkpointing: trade recomputation for memory, applied to an unchanged model.

Backward needs tensors from the forward pass (what autograd saves; see `course.memory`). A
checkpointed segment keeps only its input and recomputes everything inside it during backward
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

How it plugs in: `apply_policy(model, "sqrt")` replaces `model.blocks` by a `RecomputedBlocks`, a
`nn.ModuleList` holding the very same Block objects, so parameter names and the state_dict are
unchanged (a checkpointed model loads the same weights). "core-attention" also wraps each
`block.attn.core` in a `RecomputedCore` (attention cores hold no parameters). `Transformer.hidden_states` runs
`for block in self.blocks: x = block(x, attn_mask)`; iterating a RecomputedBlocks yields one
*segment runner* per segment instead of the blocks themselves (indexing, `.children()`,
`.modules()` still give the Blocks). `remove_policy(model)` puts a plain ModuleList and the
original cores back.

Dropout: checkpoint saves and restores the RNG state (preserve_rng_state=True), so recomputed
dropout masks equal the forward ones and gradients match no checkpointing exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from course.model import Block

POLICIES = ("none", "full", "every-k", "sqrt", "selective", "core-attention")

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
    return [(i, i + 1, policy in ("full", "selective")) for i in range(n)]  # core-attention: inside blocks


class RecomputedBlocks(nn.ModuleList):
    """The model's Blocks (same objects, same names); iterating yields one runner per segment."""

    def __init__(self, blocks=None, segments=(), selective: bool = False, policy: str = "none"):
        super().__init__(blocks)
        self.segments = list(segments) or [(i, i + 1, False) for i in range(len(self))]
        self.selective = selective
        self.policy = policy

    def _run(self, start: int, stop: int, x, attn_mask=None):
        for i in range(start, stop):
            x = self[i](x, attn_mask)
        return x  # (B, T, C)

    def _run_checkpointed(self, start: int, stop: int, x, attn_mask=None):
        ctx = selective_context if self.selective else None
        kw = {"context_fn": ctx} if ctx else {}
        if not torch.is_grad_enabled():  # eval / generate: nothing to save, nothing to recompute
            return self._run(start, stop, x, attn_mask)
        return checkpoint(self._run, start, stop, x, attn_mask, use_reentrant=False, **kw)

    def __iter__(self):
        for start, stop, ckpt in self.segments:
            yield partial(self._run_checkpointed if ckpt else self._run, start, stop)

    def __repr__(self) -> str:
        if self.policy == "core-attention":
            return f"RecomputedBlocks(policy='core-attention', {len(self)} blocks, attention cores recomputed)"
        desc = ", ".join(f"{a}-{b - 1}{'*' if c else ''}" for a, b, c in self.segments)
        return f"RecomputedBlocks(policy={self.policy!r}, {len(self)} blocks, segments [{desc}], * = recomputed)"


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


def apply_policy(model: nn.Module, policy: str, k: int | None = None) -> nn.Module:
    """Give `model` (a course.model.Transformer) a recomputation policy, in place. Returns the model."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError("apply_policy needs a model with a non-empty nn.ModuleList `blocks` of Blocks "
                         f"(course.model.Transformer), got {type(model).__name__} "
                         f"with blocks={type(blocks).__name__}")
    others = sorted({type(b).__name__ for b in blocks.children() if not isinstance(b, Block)})
    if others:
        raise ValueError(f"apply_policy: model.blocks must hold course.model.Block modules, found {others}")
    segments = segments_for(policy, len(blocks), k)
    remove_policy(model)  # a new policy replaces the old one
    model.blocks = RecomputedBlocks(list(model.blocks.children()), segments, policy == "selective",
                                    policy if policy != "every-k" else f"every-{k}")
    if policy == "core-attention":
        for block in model.blocks.children():
            block.attn.core = RecomputedCore(block.attn.core)
    return model


def remove_policy(model: nn.Module) -> nn.Module:
    """Back to a plain nn.ModuleList of the same Blocks, with their own attention cores."""
    if isinstance(getattr(model, "blocks", None), RecomputedBlocks):
        model.blocks = nn.ModuleList(list(model.blocks.children()))
        for block in model.blocks:
            if isinstance(block.attn.core, RecomputedCore):
                block.attn.core = block.attn.core.core
    return model


def policy_of(model: nn.Module) -> str:
    blocks = getattr(model, "blocks", None)
    return blocks.policy if isinstance(blocks, RecomputedBlocks) else "none"


@dataclass
class PolicyResult:
    policy: str
    activations: int  # bytes alive at the end of forward (kept for backward), measured
    peak: int  # bytes at the peak of forward + backward (weights, grads and activations), measured
    peak_activations: int  # of which activations & temporaries (not weights or gradients)
    step_time: float  # seconds, forward + backward, min over rounds
    time_ratio: float  # step_time / step_time of the first policy measured (normally "none")
    memory_ratio: float  # activations / activations of the first policy
    step: object = field(default=None, repr=False)  # the course.memory.StepMemory (timeline, breakdown)


def measure_policies(make_model, batch, policies=("none", "full", "every-k:2", "sqrt", "selective"),
                     rounds: int = 3, progress: bool = False, threads: int | None = None) -> list[PolicyResult]:
    """Memory (LiveTensors) and step time of each policy on the same model and batch.

    make_model() builds a fresh model (same seed each call). Policies are "name" or "every-k:K"; a
    "#label" suffix measures a policy again under another name: "none#control" is a second, identical
    model, and its time_ratio shows how much two runs of the same work differ on this machine.
    Timing rounds are interleaved across policies and the minimum is kept (other work on the machine
    only ever adds time), so a busy machine slows every policy alike instead of whichever ran during a
    burst. threads: torch.set_num_threads while timing (1 makes CPU ratios steadier on a shared machine).
    """
    from course.memory import measure_step  # local: course.memory imports nothing from here

    models, mem = {}, {}
    for spec in policies:
        name, _, k = spec.split("#")[0].partition(":")
        model = apply_policy(make_model(), name, int(k) if k else None)
        mem[spec] = measure_step(model, batch)
        models[spec] = model
    times = {spec: [] for spec in policies}
    it = range(rounds + 1)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="timing rounds")
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for r in it:
            for spec, model in models.items():
                times[spec].append(_one_step(model, batch))
    finally:
        torch.set_num_threads(saved_threads)
    base = policies[0]
    t = {spec: min(v[1:]) for spec, v in times.items()}  # round 0 is warm-up
    return [PolicyResult(spec, mem[spec].activations, mem[spec].peak, mem[spec].at_peak["activations & temporaries"],
                         t[spec], t[spec] / t[base],
                         mem[spec].activations / mem[base].activations, mem[spec]) for spec in policies]


def _one_step(model: nn.Module, batch) -> float:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, loss = model(*batch)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: wait before reading the clock
    dt = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return dt


def core_recompute_costs(batch: int, n_head: int, seq_len: int, head_size: int, dropout: float = 0.1,
                         device=None, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per call of each op that recomputing a written-out attention core repeats, on
    tensors of one block's shape (scores and probabilities are (B, nh, T, T)). Best of `repeats`.
    On CPU, dropout's mask (bernoulli_, a scalar random-number loop) costs several softmaxes; on a
    GPU it is generated inside the kernel and costs about as much as any pointwise op."""
    from course.attention.measure import time_it

    if not 0.0 < dropout < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {dropout!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    q, k = (torch.randn(batch, n_head, seq_len, head_size, device=dev) for _ in range(2))
    scores = q @ k.transpose(-2, -1)  # (B, nh, T, T)
    probs = scores.softmax(-1)
    ops = {"QK^T (bmm)": lambda: q @ k.transpose(-2, -1),
           "softmax": lambda: scores.softmax(-1),
           "dropout (mask + scale)": lambda: torch.nn.functional.dropout(probs, dropout, True),
           "attention over V (bmm)": lambda: probs @ q}
    return {name: time_it(fn, repeats=repeats, device=dev) * 1e3 for name, fn in ops.items()}
