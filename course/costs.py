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
    for name, v in (("s", s), ("b", b), ("h", h), ("a", a)):
        _positive(name, v)
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
    for name, v in (("s", s), ("b", b), ("h", h), ("a", a)):
        _positive(name, v)
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
    for name, v in (("s", s), ("h", h), ("n_layer", n_layer)):
        _positive(name, v)
    _positive("b", b, integer=False)  # a fraction of a sequence per rank is fine for a rate
    if not (isinstance(vocab, (int, float)) and vocab >= 0):
        raise ValueError(f"vocab must be a number >= 0 (0 leaves the logits out), got {vocab!r}")
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


# ----------------------------------------------------------------------------- published reference points

# GPT-3 175B (Brown et al. 2020): parameters and layout from Table 2.1, tokens from §2.2, training compute
# from Table D.1 (3.64e3 PF-days = 3.14e23 FLOPs). Cited, not recomputed; tests check 6·N·D against it.
GPT3_175B = {"params": 174.6e9, "n_layer": 96, "n_embd": 12288, "n_head": 96, "seq_len": 2048,
             "tokens": 300e9, "train_flops": 3.14e23}


def gpu_days(flops: float, peak_flops: float, utilisation: float = 1.0) -> float:
    """Days one device needs for `flops` at `utilisation` of its peak: a lower bound at utilisation 1."""
    _positive("flops", flops, integer=False)
    _positive("peak_flops", peak_flops, integer=False)
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation!r}")
    return flops / (peak_flops * utilisation) / 86400


def score_matrix_bytes(seq_len: int, n_head: int, batch: int = 1, n_layer: int = 1, bytes_per_el: int = 2) -> int:
    """Bytes of the attention score matrices QK^T of every head and layer, if stored: L·a·b·s²·e
    (one copy; Korthikanti et al.'s 5as²b per layer counts the softmax, its dropout mask and output)."""
    for name, v in (("seq_len", seq_len), ("n_head", n_head), ("batch", batch), ("n_layer", n_layer),
                    ("bytes_per_el", bytes_per_el)):
        _positive(name, v)
    return n_layer * n_head * batch * seq_len * seq_len * bytes_per_el


# ----------------------------------------------------------------------------- pipeline parallelism
# p pipeline stages (one per rank), m micro-batches per step, v model chunks per rank (interleaving);
# t_f, t_b: forward and backward time of one micro-batch on one stage. Two normalizations of the
# same idle time are in use, and a plot must say which it shows:
#   idle share   = idle / (idle + busy)   GPipe's (p-1)/(m+p-1)
#   bubble ratio = idle / busy            Megatron-LM's (p-1)/m, (p-1)/(v·m) with interleaving
# (busy = the ideal, bubble-free time m·(t_f + t_b)); ratio = share / (1 - share).


def _pipeline_sizes(p, m, v=1) -> None:
    for name, value in (("p", p), ("m", m), ("v", v)):
        _positive(name, value)


def gpipe_bubble_fraction(p: int, m: int) -> float:
    """Idle share of a GPipe (or 1F1B) step, (p-1)/(m+p-1): Huang et al. 2019, "GPipe", section 2.2
    (bubble overhead O((K-1)/(M+K-1)) for K partitions and M micro-batches); equal stage times, no link cost."""
    _pipeline_sizes(p, m)
    return (p - 1) / (m + p - 1)


def megatron_bubble_ratio(p: int, m: int, v: int = 1) -> float:
    """Bubble time over ideal time, (p-1)/(v·m): Narayanan et al. 2021, "Efficient large-scale language model
    training on GPU clusters using Megatron-LM", section 2.2.1 (GPipe and 1F1B, v = 1) and 2.2.2 (interleaved)."""
    _pipeline_sizes(p, m, v)
    return (p - 1) / (v * m)


def zb_h1_bubble_time(p: int, t_f: float, t_b: float, t_w: float) -> float:
    """Idle time per rank of ZB-H1, (p-1)(t_f + t_b - t_w), with t_b the input-gradient pass and t_w the
    weight-gradient pass; 1F1B's is (p-1)(t_f + t_b + t_w). Qi et al. 2023, "Zero Bubble Pipeline
    Parallelism", section 2.1 (holds when t_w <= t_f + t_b and m >= p)."""
    _pipeline_sizes(p, 1)
    for name, value in (("t_f", t_f), ("t_b", t_b), ("t_w", t_w)):
        _positive(name, value, integer=False)
    return (p - 1) * (t_f + t_b - t_w)


def pipeline_hop_elements(b: int, s: int, h: int) -> int:
    """Elements one stage sends the next per micro-batch (activations forward; their gradient comes back
    the same size): b·s·h. Narayanan et al. 2021, section 3.2, beside tensor parallelism's all-reduces of
    b·s·h twice in the forward and twice in the backward pass of every layer (8bsh(t-1)/t per layer)."""
    for name, value in (("b", b), ("s", s), ("h", h)):
        _positive(name, value)
    return b * s * h


# ----------------------------------------------------------------------------- tensor and context parallelism
# Chapter 06. Bytes are what ONE rank sends (ring_bytes), per transformer layer, forward + backward.

# Link bandwidth one GPU can SEND, bytes/s in one direction (collectives send and receive at once).
# NVLink figures in the data sheets are totals of both directions: A100 "600 GB/s" (NVIDIA A100 Tensor
# Core GPU data sheet, SXM), H100 "900 GB/s" (NVIDIA H100 data sheet, SXM5). Between nodes a DGX has
# one InfiniBand NIC per GPU: DGX A100, 8x single-port ConnectX-6 HDR 200 Gb/s (NVIDIA DGX A100 data
# sheet); DGX H100, 8x ConnectX-7 NDR 400 Gb/s (NVIDIA DGX H100 data sheet); Gb/s per direction.
LINKS = {
    "NVLink 3 (A100, in a node)": 600e9 / 2,
    "NVLink 4 (H100, in a node)": 900e9 / 2,
    "InfiniBand HDR (DGX A100, between nodes)": 200e9 / 8,
    "InfiniBand NDR (DGX H100, between nodes)": 400e9 / 8,
}


def link_seconds(nbytes: float, link: str) -> float:
    """Seconds to send nbytes at the link's one-direction bandwidth (latency ignored: large messages)."""
    if link not in LINKS:
        raise ValueError(f"link must be one of {sorted(LINKS)}, got {link!r}")
    return nbytes / LINKS[link]


def tensor_parallel_bytes(b: int, s: int, h: int, t: int, *, bytes_per_el: int = 2,
                          sequence_parallel: bool = False) -> dict[str, float]:
    """Bytes one rank sends per layer (forward + backward) for tensor parallelism over t ranks.

    Megatron-LM (Shoeybi et al. 2019, section 3): 2 all-reduces of the (b, s, h) activations forward
    (after attention and after the MLP) and 2 backward (their conjugates): 4 x 2(t-1)/t·bsh elements
    = 8·bsh·(t-1)/t elements, times bytes_per_el (16-bit: 16·bsh·(t-1)/t bytes).
    Sequence parallelism (Korthikanti et al. 2022, section 4.2.2): each all-reduce becomes a
    reduce-scatter + all-gather, the same bytes; Megatron-LM keeps only the input shard of the two
    column-parallel linears and all-gathers it again in backward: 2 more all-gathers ("regather")."""
    for name, v in (("b", b), ("s", s), ("h", h), ("t", t)):
        _positive(name, v)
    n = b * s * h * bytes_per_el
    if not sequence_parallel:
        ar = 4 * ring_bytes("all_reduce", n, t)
        return {"all_reduce": ar, "total": ar}
    half = ring_bytes("all_gather", n, t)
    out = {"all_gather": 4 * half, "reduce_scatter": 4 * half, "regather": 2 * half}
    out["total"] = sum(out.values())
    return out


_HEAD_SHARDED = ("attention core", "attn.c_proj input", "gelu input", "mlp.c_proj input")


def tensor_parallel_layer_bytes(s: int, b: int, h: int, a: int, t: int, *, sequence_parallel: bool = False,
                                **kw) -> dict[str, int]:
    """Bytes one Block saves for backward per rank under tensor (and sequence) parallelism, per part of
    `layer_activation_bytes` (same keyword arguments). Tensor parallelism divides the parts between the
    column- and row-parallel linears by t (a/t heads, 4h/t MLP columns); sequence parallelism also the
    LayerNorm, dropout and linear-input parts (T/t tokens; the linears keep their input shard), so then
    every part is divided by t except the boolean causal mask of a written-out core (s², replicated)."""
    check = [("a", a, t), ("h", h, t)] + ([("s", s, t)] if sequence_parallel else [])
    for name, value, div in check:
        if value % div:
            raise ValueError(f"{name}={value} is not divisible by t={t}")
    parts = layer_activation_bytes(s, b, h, a, **kw)
    mask = s * s if kw.get("core", "sdpa") == "matmul" else 0
    out = {}
    for name, v in parts.items():
        fixed = mask if name == "attention core" else 0
        sharded = sequence_parallel or name in _HEAD_SHARDED
        out[name] = (v - fixed) // t + fixed if sharded else v
    return out


def korthikanti_tp_layer_bytes(s: int, b: int, h: int, a: int, t: int, sequence_parallel: bool = False) -> float:
    """Korthikanti et al. 2022, Table 2 (16-bit, no recomputation): tensor parallel sbh(10 + 24/t + 5as/(ht));
    tensor + sequence parallel sbh/t·(34 + 5as/h)."""
    if sequence_parallel:
        return s * b * h / t * (34 + 5 * a * s / h)
    return s * b * h * (10 + 24 / t + 5 * a * s / (h * t))


def data_parallel_layer_bytes(h: int, world: int, *, bytes_per_el: int = 2, bias: bool = True) -> float:
    """Bytes one rank sends per layer per optimizer step for data parallelism: the all-reduce of the
    layer's gradients, 12h² weights (+ 13h biases and LayerNorm parameters with bias): ring all-reduce
    2(N-1)/N of them (Li et al. 2020). Once per step, whatever the batch."""
    n_params = 12 * h * h + (13 * h if bias else 4 * h)
    return ring_bytes("all_reduce", n_params * bytes_per_el, world)


def ring_attention_bytes(b: int, s: int, h: int, cp: int, *, bytes_per_el: int = 2) -> dict[str, float]:
    """Bytes one rank sends per attention layer for ring attention over cp ranks (course.parallel.context):
    K and V shards (2·b·(s/cp)·h elements) travel cp-1 hops forward; backward they travel cp-1 hops again
    and their gradients cp hops (the last one home). Liu et al. 2023, section 3."""
    for name, v in (("b", b), ("s", s), ("h", h), ("cp", cp)):
        _positive(name, v)
    kv = 2 * b * s // cp * h * bytes_per_el
    out = {"forward": (cp - 1) * kv, "backward": (cp - 1) * kv + (cp * kv if cp > 1 else 0)}
    out["total"] = out["forward"] + out["backward"]
    return out


def ulysses_bytes(b: int, s: int, h: int, cp: int, *, bytes_per_el: int = 2) -> dict[str, float]:
    """Bytes one rank sends per attention layer for DeepSpeed-Ulysses (Jacobs et al. 2023, section 3.2):
    all-to-alls of q, k, v and the output, b·(s/cp)·h elements each, (cp-1)/cp of which leave the rank;
    backward the same: 8·b·s·h·(cp-1)/cp² elements in all."""
    for name, v in (("b", b), ("s", s), ("h", h), ("cp", cp)):
        _positive(name, v)
    one = ring_bytes("all_to_all", b * s // cp * h * bytes_per_el, cp)
    return {"forward": 4 * one, "backward": 4 * one, "total": 8 * one}


def ring_attention_saved_bytes(b: int, s: int, h: int, a: int, cp: int, *, bytes_per_el: int = 4) -> int:
    """Bytes ring attention keeps for backward per rank: q, k, v and the output of its s/cp tokens
    (4·b·(s/cp)·h) and one log-sum-exp per query and head (a·b·s/cp), in the inputs' dtype."""
    sl = s // cp
    return (4 * b * sl * h + a * b * sl) * bytes_per_el


# ----------------------------------------------------------------------------- 3D parallelism (chapter 08)
# Closed forms the planner (course.scale) composes. Symbols: l layers, h width, a heads, s sequence,
# b micro-batch size, B global batch (sequences), V vocabulary, t tensor, p pipeline, v model chunks per
# pipeline rank, m micro-batches per iteration, all bytes in 16-bit (2 per element) unless named.


def gpt_params(n_layer: int, d_model: int, vocab: int, seq_len: int) -> int:
    """Exact parameter count of the GPT-2/GPT-3 layout (course.model.Transformer with biases, tied head):
    per layer 12h² + 13h (qkv 3h² + 3h, projection h² + h, MLP 8h² + 5h, two LayerNorms 4h), the token and
    learned position embeddings (V + s)·h and the final LayerNorm 2h. Narayanan et al. 2021, eq. 2, is
    12lh²(1 + 13/12h + (V + s)/12lh): the same without the final LayerNorm."""
    for name, v in (("n_layer", n_layer), ("d_model", d_model), ("vocab", vocab), ("seq_len", seq_len)):
        _positive(name, v)
    return n_layer * (12 * d_model * d_model + 13 * d_model) + (vocab + seq_len) * d_model + 2 * d_model


def tp_layer_activation_bytes(s: int, b: int, h: int, a: int, t: int = 1, sp: bool = False,
                              recompute: str = "none") -> float:
    """Activation bytes one transformer layer keeps per micro-batch on one tensor-parallel rank.

    Korthikanti et al. 2022, Table 2 (16-bit activations, 1-byte dropout masks): tensor parallelism
    alone sbh(10 + 24/t + 5as/ht) (the 10sbh of LayerNorm and dropout inputs stay replicated);
    with sequence parallelism sbh(34/t + 5as/ht); selective recomputation drops the 5as/ht term; full
    recomputation keeps the layer input, 2sbh (2sbh/t when sequence parallelism shards it, as Megatron's
    checkpoint of the sequence-parallel region does). Context parallelism: pass s = the local s/cp and
    the score term is the caller's (see course.scale)."""
    for name, v in (("s", s), ("b", b), ("h", h), ("a", a), ("t", t)):
        _positive(name, v)
    sbh = s * b * h
    if recompute == "full":
        return 2 * sbh / (t if sp else 1)
    if recompute not in ("none", "selective"):
        raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {recompute!r}")
    linear = 34 * sbh / t if sp else sbh * (10 + 24 / t)
    scores = 5 * a * s * s * b / t if recompute == "none" else 0.0
    return linear + scores


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")


def pipeline_bubble(p: int, m: int, v: int = 1) -> float:
    """Pipeline bubble relative to the ideal (bubble-free) time: (p - 1)/(v·m) (Narayanan et al. 2021,
    section 2.2: GPipe and 1F1B (p - 1)/m, the interleaved schedule with v chunks per rank divides it by v).
    GPipe's idle share of the total time is the other normalisation, (p - 1)/(m + p - 1)."""
    for name, x in (("p", p), ("m", m), ("v", v)):
        _positive(name, x)
    return (p - 1) / (v * m)


def in_flight_microbatches(schedule: str, p: int, m: int, v: int = 1, stage: int = 0) -> float:
    """Micro-batches whose activations pipeline rank `stage` holds at its peak, in units of its full
    share of layers (l/p): GPipe all m (Huang et al. 2019: every forward runs before any backward);
    1F1B min(m, p - stage) (Narayanan et al. 2021, section 2.2.1: "at most p" in flight); interleaved
    with v chunks of l/(pv) layers: (v - 1)p + 2(p - stage - 1) + 1 chunk micro-batches warm up first
    (Megatron-LM's schedule), capped at v·m, i.e. 1 + (p - 1)/(pv) times 1F1B's p on the first rank
    (Korthikanti et al. 2022, section 4.2.3)."""
    for name, x in (("p", p), ("m", m), ("v", v)):
        _positive(name, x)
    if not (isinstance(stage, int) and 0 <= stage < p):
        raise ValueError(f"stage must be an integer in [0, p={p}), got {stage!r}")
    if schedule == "gpipe":
        return float(m)
    if schedule == "1f1b":
        return float(min(m, p - stage))
    if schedule == "interleaved":
        return min(v * m, (v - 1) * p + 2 * (p - stage - 1) + 1) / v
    raise ValueError(f"schedule must be one of {PIPELINE_SCHEDULES}, got {schedule!r}")


COLLECTIVE_STEPS = {"all_reduce": lambda n: 2 * (n - 1), "reduce_scatter": lambda n: n - 1,
                    "all_gather": lambda n: n - 1, "send": lambda n: 1}


def collective_seconds(op: str, nbytes: float, world: int, bandwidth: float, latency: float) -> float:
    """Alpha-beta time of a ring collective (Hockney 1994; Patarasuk & Yuan 2009): steps·α + bytes/β,
    with the bytes one rank sends (`ring_bytes`; a point-to-point send sends all n) at β bytes/s per
    direction, and 2(N - 1) steps for all-reduce, N - 1 for reduce-scatter and all-gather, 1 for a send."""
    if op not in COLLECTIVE_STEPS:
        raise ValueError(f"op must be one of {sorted(COLLECTIVE_STEPS)}, got {op!r}")
    _positive("world", world)
    _positive("bandwidth", bandwidth, integer=False)
    if not (isinstance(latency, (int, float)) and latency >= 0):
        raise ValueError(f"latency must be a number >= 0 (seconds), got {latency!r}")
    if op != "send" and world == 1:
        return 0.0
    sent = nbytes if op == "send" else ring_bytes(op, nbytes, world)
    return COLLECTIVE_STEPS[op](world) * latency + sent / bandwidth


def megatron_train_days(tokens: float, n_params: float, n_gpus: int, flops_per_gpu: float) -> float:
    """End-to-end training time, Narayanan et al. 2021 section 5.1 eq. 4: 8·T·P/(n·X) seconds (eq. 3 with
    full recomputation, s ≪ 6h and V ≪ 16lh), in days. 175B, 300B tokens, 1,024 A100 at 140 TFLOP/s: 34."""
    for name, x in (("tokens", tokens), ("n_params", n_params), ("flops_per_gpu", flops_per_gpu)):
        _positive(name, x, integer=False)
    _positive("n_gpus", n_gpus)
    return 8 * tokens * n_params / (n_gpus * flops_per_gpu) / 86400


def model_flops_utilization(tokens_per_s: float, n_params: float, n_layer: int, d_model: int, seq_len: int,
                            n_gpus: int, peak: float) -> float:
    """MFU (Chowdhery et al. 2022, PaLM appendix B): model FLOPs per token (`flops_per_token`: 6N + 12·L·h·T,
    no recomputation counted) × tokens/s over the peak of all devices."""
    _positive("tokens_per_s", tokens_per_s, integer=False)
    _positive("n_gpus", n_gpus)
    _positive("peak", peak, integer=False)
    return flops_per_token(n_params, n_layer, d_model, seq_len) * tokens_per_s / (n_gpus * peak)
