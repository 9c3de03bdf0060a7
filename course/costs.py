"""Formulas, one home: FLOPs, activation and model-state bytes, collective bytes, device peaks.

Pure functions of sizes (no tensors, no torch calls), each citing where it comes from. Every lesson,
planner and benchmark takes its formulas from here; tests check each one against a measurement
(`course.measure`) or a published table, never against itself.

FLOPs
- `flops_per_token(n_params, n_layer, n_embd, seq_len)`: training FLOPs per token, 6N for the weights
  (forward 2N, backward 4N: Kaplan et al. 2020, section 2.1) + 12·L·h·T for attention scores and
  their use (PaLM, Chowdhery et al. 2022, appendix B).
- `korthikanti_flops`: FLOPs per iteration with and without recomputation (Korthikanti et al. 2022).
- `attention_pair_flops(n_pairs, head_dim)`: 12·n·d per head for forward + backward over n kept
  (query, key) pairs (see course.sparse.cost).

Model state (Rajbhandari et al. 2020, "ZeRO", section 3 and figure 1)
- `model_state_bytes(n_params, precision, stage, world)`: parameters, gradients and optimizer state per
  rank. fp32 AdamW keeps 4 + 4 + 8 bytes per parameter; mixed precision 2 + 2 + K with K = 12 (fp32
  master weights, momentum, variance); ZeRO stage 1 divides the optimizer state by N, stage 2 also the
  gradients, stage 3 also the parameters.

Collectives (Patarasuk & Yuan 2009; what NCCL and gloo ring algorithms send for large messages)
- `ring_bytes(op, nbytes, world)`: bytes one rank sends for a tensor of n bytes on N ranks:
  reduce-scatter and all-gather (N-1)/N·n, all-reduce 2(N-1)/N·n, broadcast n; all-to-all
  (N-1)/N·n (pairwise exchange: each rank keeps 1/N of its own tensor).

Device peaks
- `PEAK_FLOPS`: dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets (SXM parts),
  for MFU; CPU peaks are unknown, so MFU is reported only on these GPUs.

Activations
Analytic bytes per layer for THIS block (course.model.Block, pre-LN GPT-2; s tokens, b batch, h width,
a heads, e bytes per element, m bytes per dropout-mask element). Every term below was checked
tensor by tensor against `course.measure.saved_tensors` (tests/test_memory.py):
  ln_1:          input x (sbh·e) + mean, rstd (2·sb·stat)
  attn.c_attn:   input ln_1(x) (sbh·e)
  core, fused (SDPA flash): q, k, v as views of the c_attn output (3sbh·e), output (sbh·e),
                 logsumexp (asb·4, fp32). The output is already laid out (B, T, nh, hs), so the
                 transpose().contiguous() before c_proj is free and c_proj's input shares its storage.
  core, written out (MatmulAttention, and SDPA's math fallback on CPU when dropout > 0, which
                 computes in fp32 even for 16-bit inputs): contiguous copies of q, k^T, v (3sbh·e),
                 softmax output (as²b·e), with dropout: mask (as²b·m) + dropped probabilities (as²b·e);
                 MatmulAttention also keeps the boolean causal mask of masked_fill (s² bytes)
  attn.c_proj:   input (sbh·e; 0 when fused, see above)
  ln_2:          input (sbh·e) + mean, rstd
  mlp:           c_fc input (sbh·e), GELU(tanh) input (4sbh·e), c_proj input (4sbh·e)
  dropout:       one mask after attention and one after the MLP (sbh·m each)
With the written-out core in 16-bit and 1-byte masks this is exactly Korthikanti et al. 2022
("Reducing activation recomputation in large transformer models", section 4.1):
  attention 2 + (4 + 2) + 2 + 1 = 11sbh + 5as²b, MLP 2 + 8 + 8 + 1 = 19sbh, LayerNorms 2 + 2
  = 34sbh + 5as²b,
plus two small terms the paper drops: LayerNorm mean/rstd (4sb·stat) and the causal mask (s²).
Where this block differs from the paper's 34:
- CPU dropout masks are not bytes: on CPU, F.dropout multiplies by a mask of the input's dtype
  (4 bytes in fp32, 2 in bf16); CUDA's fused native_dropout keeps a 1-byte bool mask. m follows
  the device; on CPU in 16-bit a layer keeps 36sbh + 6as²b, not 34sbh + 5as²b.
- Fused SDPA removes exactly the 5as²b term (backward recomputes the s×s scores from q, k, v and the
  logsumexp) and adds asb·4 bytes of logsumexp: 32sbh in 16-bit without dropout (16 elements).
- In fp32 every e-term doubles: 64sbh bytes per layer with fused attention and no dropout.
"16-bit" here means a model cast to bf16/fp16 (activations stored in 16-bit, as the paper assumes).
Under torch.autocast, LayerNorm and softmax run in fp32 and casts add copies; that is not modelled.
On CUDA the LayerNorm statistics are fp32 (stat = 4) and the masks 1 byte; those two rules and the
fused-kernel layout are the GPU assumptions not checked on this CPU machine.
`flash_layer_bytes`: the block with course.flash.FlashAttention as its core (FlashAttention-2,
Dao 2023, Algorithms 1 and 2): the kernel saves q, k, v (views of the c_attn output, 3sbh·e), its
output O (sbh·e, laid out like SDPA's, so c_proj's input shares it) and L, one float32 log-sum-exp
per query row (asb·4); dropout is regenerated from a seed, so no mask and no s×s term at all, with
or without dropout, on any device: the fused-SDPA bytes above, plus the two residual-dropout masks.
"""
from __future__ import annotations

import math

# Dense bf16 peak FLOP/s (no 2:4 sparsity), NVIDIA data sheets (SXM parts): V100 (fp16 tensor cores),
# A100, H100, H200, B200.
PEAK_FLOPS = {
    "V100": 125e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
}

PRECISIONS = {"fp32": (4, 4, 8), "mixed": (2, 2, 12), "bf16": (2, 2, 4)}  # bytes/param: params, grads, optimizer
ZERO_STAGES = (0, 1, 2, 3)


def _positive(name: str, value, integer: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)
    if not ok or (integer and not float(value).is_integer()):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def flops_per_token(n_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N (weights, forward + backward) + 12·L·h·T (attention; PaLM appendix B).

    n_params: parameters that multiply activations (a GPT's non-embedding count plus its tied head)."""
    for name, v in (("n_params", n_params), ("n_layer", n_layer), ("n_embd", n_embd), ("seq_len", seq_len)):
        _positive(name, v)
    return 6 * n_params + 12 * n_layer * n_embd * seq_len


def attention_pair_flops(n_pairs: float, head_dim: int) -> float:
    """Forward + backward FLOPs of attention over n kept (query, key) pairs of one head: 12·n·d.
    Forward 4nd (S = QK^T 2nd, O = PV 2nd); backward 8nd (dV, dP, dQ, dK: 2nd each)."""
    if not n_pairs >= 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs!r}")
    _positive("head_dim", head_dim)
    return 12.0 * n_pairs * head_dim


def model_state_bytes(n_params: float, precision: str = "mixed", stage: int = 0, world: int = 1) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state per rank; stage 0 is plain data parallelism.

    precision: "fp32" (4, 4, 8 bytes per parameter: fp32 AdamW, what the CPU code runs), "mixed"
    (2, 2, 12: the ZeRO paper's mixed-precision Adam, K = 12) or "bf16" (2, 2, 4: bf16 AdamW states).
    Returns {"params", "grads", "optimizer", "total"}. ZeRO paper, figure 1 (7.5B, N = 64, mixed):
    120 / 31.4 / 16.6 / 1.9 GB for stages 0 / 1 / 2 / 3.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if stage not in ZERO_STAGES or isinstance(stage, bool):
        raise ValueError(f"stage must be 0 (plain data parallelism), 1, 2 or 3, got {stage!r}")
    _positive("n_params", n_params, integer=False)
    _positive("world", world)
    p, g, o = (b * n_params for b in PRECISIONS[precision])
    out = {"params": p / world if stage >= 3 else p,
           "grads": g / world if stage >= 2 else g,
           "optimizer": o / world if stage >= 1 else o}
    out["total"] = out["params"] + out["grads"] + out["optimizer"]
    return out


RING_FACTORS = {"all_reduce": lambda n: 2 * (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n,
                "all_gather": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n,
                "broadcast": lambda n: 1.0}


def ring_bytes(op: str, nbytes: float, world: int) -> float:
    """Bytes one rank sends for collective `op` on a tensor of `nbytes` (full size) over `world` ranks."""
    if op not in RING_FACTORS:
        raise ValueError(f"op must be one of {sorted(RING_FACTORS)}, got {op!r}")
    if not (isinstance(nbytes, (int, float)) and nbytes >= 0):
        raise ValueError(f"nbytes must be a number >= 0, got {nbytes!r}")
    _positive("world", world)
    return 0.0 if world == 1 else RING_FACTORS[op](world) * nbytes


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes(s: int, b: int, h: int, a: int, *, bytes_per_el: int = 4, core: str = "sdpa",
                           dropout: bool = False, device: str = "cpu") -> dict[str, int]:
    """Bytes one course.model.Block saves for backward, per sublayer (see the module docstring).

    core: "sdpa" (fused F.scaled_dot_product_attention, the model's default) or "matmul"
    (MatmulAttention). device: "cpu" or "cuda" (dropout-mask and LayerNorm-statistics dtypes differ).
    """
    if core not in ("sdpa", "matmul"):
        raise ValueError(f"core must be 'sdpa' or 'matmul', got {core!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if bytes_per_el not in (2, 4):
        raise ValueError(f"bytes_per_el must be 2 (bf16/fp16) or 4 (fp32), got {bytes_per_el!r}")
    e = bytes_per_el
    m = (1 if device == "cuda" else e) if dropout else 0  # dropout-mask bytes per element
    stat = 4 if device == "cuda" else e  # LayerNorm mean/rstd dtype
    sbh = s * b * h
    ln = sbh * e + 2 * s * b * stat
    fused = core == "sdpa" and not (dropout and device == "cpu")  # CPU flash kernel has no dropout
    if fused:
        attn_core = 4 * sbh * e + a * s * b * 4  # q, k, v (views of qkv) + output + logsumexp
    else:
        # SDPA's math fallback on CPU computes in fp32 even for 16-bit inputs
        ce = 4 if core == "sdpa" else e
        cm = (1 if device == "cuda" else ce) if dropout else 0
        scores = a * s * s * b
        attn_core = 3 * sbh * ce + scores * ce + (scores * (cm + ce) if dropout else 0)
        attn_core += s * s if core == "matmul" else 0  # boolean causal mask for masked_fill
    return {
        "ln_1": ln,
        "attn.c_attn input": sbh * e,
        "attention core": attn_core,
        "attn.c_proj input": 0 if fused else sbh * e,  # fused output is already (B, T, nh, hs): shared
        "attn dropout mask": sbh * m,
        "ln_2": ln,
        "mlp.c_fc input": sbh * e,
        "gelu input": 4 * sbh * e,
        "mlp.c_proj input": 4 * sbh * e,
        "mlp dropout mask": sbh * m,
    }


def flash_layer_bytes(s: int, b: int, h: int, a: int, *, bytes_per_el: int = 4, dropout: bool = False,
                      device: str = "cpu") -> dict[str, int]:
    """Bytes one Block saves with the course.flash kernel as its attention core (see the module docstring):
    the fused layout without an s×s term, dropout or not (Dao 2023: only O and the log-sum-exp are kept)."""
    parts = layer_activation_bytes(s, b, h, a, bytes_per_el=bytes_per_el, core="sdpa", dropout=False, device=device)
    m = (1 if device == "cuda" else bytes_per_el) if dropout else 0  # residual dropout masks stay as they are
    return {**parts, "attn dropout mask": s * b * h * m, "mlp dropout mask": s * b * h * m}


def korthikanti_layer_bytes(s: int, b: int, h: int, a: int, recompute: str = "none") -> int:
    """Korthikanti et al. 2022, 16-bit activations, 1-byte dropout masks, no tensor parallelism.

    none: sbh(34 + 5as/h); selective (attention core recomputed): 34sbh; full: 2sbh (layer input).
    """
    if recompute == "none":
        return round(s * b * h * (34 + 5 * a * s / h))
    if recompute == "selective":
        return 34 * s * b * h
    if recompute == "full":
        return 2 * s * b * h
    raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")


def korthikanti_flops(s: int, b: int, h: int, n_layer: int, vocab: int, recompute: str = "none") -> float:
    """FLOPs per iteration, Korthikanti et al. 2022 appendix: 72·b·s·l·h²(1 + s/6h + V/12hl) without
    recomputation; selective recompute is counted as s/3h, full recompute as 96·b·s·l·h²(1 + s/6h + V/16lh)."""
    base = 72 * b * s * n_layer * h * h
    if recompute == "none":
        return base * (1 + s / (6 * h) + vocab / (12 * h * n_layer))
    if recompute == "selective":
        return base * (1 + s / (3 * h) + vocab / (12 * h * n_layer))
    if recompute == "full":
        return 96 * b * s * n_layer * h * h * (1 + s / (6 * h) + vocab / (16 * h * n_layer))
    raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")


def head_activation_bytes(s: int, b: int, h: int, vocab: int, *, bytes_per_el: int = 4,
                          dropout: bool = False, device: str = "cpu", separate_targets: bool = True) -> int:
    """Bytes saved outside the blocks by course.model.Transformer (GPT): token and position ids (int64,
    kept by the embedding backward), embedding dropout mask, ln_f input + stats, lm_head input, the
    log-softmax output (b·s·V) and the int64 targets with a 4-byte total weight for cross-entropy."""
    e = bytes_per_el
    m = (1 if device == "cuda" else e) if dropout else 0
    stat = 4 if device == "cuda" else e
    ids = 8 * s * b + 8 * s + (8 * s * b if separate_targets else 0)
    return ids + s * b * h * m + (s * b * h * e + 2 * s * b * stat) + s * b * h * e + s * b * vocab * e + e


def selective_layer_bytes(s: int, b: int, h: int, a: int, *, bytes_per_el: int = 4, core: str = "sdpa",
                          dropout: bool = False, device: str = "cpu") -> int:
    """Bytes one Block keeps under course.recompute's selective policy: its input (checkpoint),
    the outputs of its four linears (qkv 3sbh, attn proj sbh, c_fc 4sbh, mlp proj sbh) and, when the
    attention kernel is fused, that kernel's output and logsumexp. Everything else is recomputed."""
    layer_activation_bytes(s, b, h, a, bytes_per_el=bytes_per_el, core=core, dropout=dropout, device=device)
    x = s * b * h * bytes_per_el
    fused = core == "sdpa" and not (dropout and device == "cpu")
    return 10 * x + ((x + a * s * b * 4) if fused else 0)


def core_attention_layer_bytes(s: int, b: int, h: int, a: int, *, bytes_per_el: int = 4, core: str = "sdpa",
                               dropout: bool = False, device: str = "cpu") -> int:
    """Bytes one Block keeps under the core-attention policy: everything but the attention core, which
    keeps only q, k, v (views of c_attn's output, 3sbh). Fused attention keeps no s*s tensor: unchanged."""
    parts = layer_activation_bytes(s, b, h, a, bytes_per_el=bytes_per_el, core=core, dropout=dropout, device=device)
    if core == "sdpa" and not (dropout and device == "cpu"):
        return sum(parts.values())
    return sum(parts.values()) - parts["attention core"] + 3 * s * b * h * bytes_per_el
