"""Where training memory goes: measured (what autograd saves, what is alive) and analytic.

Training memory = weights + gradients + optimizer state + activations (tensors the forward pass keeps
for backward) + temporaries. The first three scale with the parameter count N: fp32 AdamW keeps
4 + 4 + 8 = 16 bytes/param; mixed precision (Rajbhandari et al. 2020, ZeRO) keeps 2 (16-bit weights)
+ 2 (16-bit grads) + 12 (fp32 master weights, Adam m, v) = 16 bytes/param too. Activations scale with
s·b (tokens) and, without fused attention, with a·s²·b.

Measurement (works on CPU, where tracemalloc cannot see tensor storage):
- `saved_tensors(model, fn)`: every tensor autograd saves while `fn()` runs, through
  `torch.autograd.graph.saved_tensors_hooks`; counted once per storage (q, k, v are views of one
  c_attn output), parameters excluded, labelled by module (forward pre/post hooks) and by the
  backward node that holds it (walk of the graph, e.g. "addmm", "native_layer_norm").
  Caveat: inside a non-reentrant checkpoint region checkpoint installs its own hooks, which take
  precedence, so tensors held by checkpoint regions are invisible here: use `LiveTensors`.
- `LiveTensors`: a TorchDispatchMode that sees every op output, follows its storage, and subtracts it
  when the storage is freed (a weakref finalizer on the storage). Gives the peak and a timeline of a
  whole training step, including recomputation inside backward. On CUDA, `measure_step` also reports
  torch.cuda.max_memory_allocated (allocator view: includes rounding and cached workspaces).

Analytic bytes per layer for THIS block (course.model.Block, pre-LN GPT-2; s tokens, b batch, h width,
a heads, e bytes per element, m bytes per dropout-mask element). Every term below was checked
tensor by tensor against `saved_tensors` (tests/test_memory.py):
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
"""
from __future__ import annotations

import math
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

# ----------------------------------------------------------------------------- saved tensors


@dataclass
class SavedTensor:
    module: str  # deepest module running when autograd saved it ("" = outside any module)
    op: str  # backward node holding it, e.g. "addmm", "gelu" ("?" if not reached from the output)
    shape: tuple
    dtype: torch.dtype
    nbytes: int  # bytes of its storage, 0 if that storage was already counted (shared)


@dataclass
class SavedReport:
    tensors: list[SavedTensor]

    @property
    def total(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_module(self, depth: int | None = None) -> dict[str, int]:
        """Bytes per module name, truncated to `depth` dotted parts ("blocks.0" with depth=2)."""
        out: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            name = t.module if depth is None else ".".join(t.module.split(".")[:depth])
            out[name] += t.nbytes
        return dict(out)

    def by_op(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            out[t.op] += t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def under(self, prefix: str) -> int:
        """Bytes saved inside module `prefix` (e.g. "blocks.2")."""
        return sum(t.nbytes for t in self.tensors if t.module == prefix or t.module.startswith(prefix + "."))

    def __repr__(self) -> str:
        ops = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in list(self.by_op().items())[:6])
        return f"SavedReport({self.total / 2**20:.2f} MiB in {len(self.tensors)} saved tensors; MiB by op: {ops})"


def _op_name(node) -> str:
    name = node.name()  # e.g. "AddmmBackward0"
    name = name[: name.rfind("Backward")] if "Backward" in name else name
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")  # addmm, native_layer_norm


def saved_tensors(model: nn.Module, fn) -> tuple[SavedReport, object]:
    """Run `fn()` (a forward pass returning a tensor, e.g. the loss) and account what autograd saves.

    Returns (report, fn's result). Keep the result alive if you want to call backward on it.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack = [""]
    records: list[SavedTensor] = []
    seen: set[int] = set()
    last = [None]

    def pack(t):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in param_storages:
            nbytes = -1  # a weight (or a view of one): not an activation
        elif key in seen or st.nbytes() == 0:
            nbytes = 0
        else:
            seen.add(key)
            nbytes = st.nbytes()
        records.append(SavedTensor(stack[-1], "?", tuple(t.shape), t.dtype, nbytes))
        return len(records) - 1, t

    def unpack(packed):
        last[0] = packed[0]
        return packed[1]

    names = {m: n for n, m in model.named_modules()}

    def enter(module, args):
        if module in names:
            stack.append(names[module])

    def leave(module, args, output):
        if module in names:
            stack.pop()  # returns None: a forward hook returning a value would replace the output

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
             torch.nn.modules.module.register_module_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            out = fn()
    finally:
        for h in hooks:
            h.remove()
    # label each saved tensor with the backward node that holds it
    root = out if isinstance(out, torch.Tensor) else out[-1]
    todo, visited = [root.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                last[0] = None
                value = getattr(node, attr)  # unpacks -> sets last[0] for a hooked tensor
                for v in (value if isinstance(value, (tuple, list)) else [value]):
                    if isinstance(v, torch.Tensor) and last[0] is not None:
                        records[last[0]].op = _op_name(node)
        todo.extend(nxt for nxt, _ in node.next_functions)
    return SavedReport([r for r in records if r.nbytes >= 0]), out


# ----------------------------------------------------------------------------- live tensors


class LiveTensors(TorchDispatchMode):
    """Bytes of every live tensor storage created or registered while active; peak and timeline.

    Storages alive before entering (weights, optimizer state) are invisible unless `register`ed.
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, int]] = {}  # data_ptr -> (uid, nbytes)
        self.current = 0
        self.peak = 0
        self._events: list[tuple[int, bool]] = []  # (uid, allocated?) in order, to find what was live at the peak
        self._peak_at = 0
        self.timeline: list[int] = []  # live bytes after each op
        self.marks: dict[str, int] = {}  # phase name -> index into timeline
        self._uid = 0
        self._finalizers = []

    def register(self, t: torch.Tensor) -> int | None:
        """Follow t's storage; returns its uid (None for an empty storage)."""
        st = t.untyped_storage()
        ptr, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0:
            return None
        if ptr in self.live:
            return self.live[ptr][0]
        self._uid += 1
        self.live[ptr] = (self._uid, nbytes)
        self.current += nbytes
        self._events.append((self._uid, True))
        self._finalizers.append(weakref.finalize(st, self._free, ptr, self._uid))  # runs when storage dies
        if self.current > self.peak:
            self.peak, self._peak_at = self.current, len(self._events)
        return self._uid

    def _free(self, ptr: int, uid: int):
        entry = self.live.get(ptr)
        if entry is not None and entry[0] == uid:
            del self.live[ptr]
            self.current -= entry[1]
            self._events.append((uid, False))

    @property
    def peak_uids(self) -> set[int]:
        """uids of the storages alive at the peak."""
        alive: set[int] = set()
        for uid, allocated in self._events[: self._peak_at]:
            (alive.add if allocated else alive.discard)(uid)
        return alive

    def uid_of(self, t: torch.Tensor) -> int | None:
        entry = self.live.get(t.untyped_storage().data_ptr())
        return entry[0] if entry else None

    def mark(self, phase: str):
        self.marks[phase] = len(self.timeline)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.register(t)
        self.timeline.append(self.current)
        return out

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        for f in self._finalizers:
            f.detach()
        return result


@dataclass
class StepMemory:
    """One training step, measured. Bytes throughout."""

    peak: int  # largest live total (all tracked storages)
    at_peak: dict[str, int]  # what was alive at the peak: weights, gradients, optimizer state, activations
    activations: int  # kept alive from the end of forward for backward (plus the logits/loss returned)
    timeline: list[int] = field(repr=False)
    marks: dict[str, int] = field(repr=False)
    cuda_peak: int | None = None  # torch.cuda.max_memory_allocated, on GPU

    def __repr__(self) -> str:
        parts = ", ".join(f"{k} {v / 2**20:.2f}" for k, v in self.at_peak.items())
        return f"StepMemory(peak {self.peak / 2**20:.2f} MiB; at peak MiB: {parts}; activations {self.activations / 2**20:.2f} MiB)"


def measure_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer | None = None) -> StepMemory:
    """Forward, backward and (optionally) optimizer.step on `batch` = (x, y[, attn_mask]), tracked.

    Call it after one warm-up step if you want the optimizer state to exist already (AdamW creates m, v
    in its first step; then they show up as "optimizer state" rather than being created at the peak).
    """
    params = list(model.parameters())
    device = params[0].device
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tracker = LiveTensors()
    for p in params:
        tracker.register(p)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    tracker.register(v)
    for t in batch:
        if t is not None:
            tracker.register(t)
    for p in params:
        p.grad = None
    with tracker:
        tracker.mark("forward")
        before = tracker.current
        _, loss = model(*batch)
        activations = tracker.current - before
        tracker.mark("backward")
        loss.backward()
        if optimizer is not None:
            tracker.mark("optimizer")
            optimizer.step()
        tracker.mark("end")
        uids = {
            "weights": {tracker.uid_of(p) for p in params},
            "gradients": {tracker.uid_of(p.grad) for p in params if p.grad is not None},
            "optimizer state": {tracker.uid_of(v) for s in (optimizer.state.values() if optimizer else [])
                                for v in s.values() if isinstance(v, torch.Tensor)},
        }
        sizes = {uid: n for uid, n in tracker.live.values()}
        peak_uids, peak = set(tracker.peak_uids), tracker.peak
    del loss
    at_peak = {k: sum(sizes.get(u, 0) for u in v & peak_uids) for k, v in uids.items()}
    at_peak["activations & temporaries"] = peak - sum(at_peak.values())
    cuda_peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return StepMemory(peak, at_peak, activations, tracker.timeline, tracker.marks, cuda_peak)


# ----------------------------------------------------------------------------- analytic model


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


def model_state_bytes(n_params: int, precision: str = "mixed") -> dict[str, int]:
    """Weights, gradients and AdamW state. fp32: 4+4+8; mixed: 2+2+(4+4+4) (ZeRO's K=12); bf16: 2+2+4."""
    table = {"fp32": (4, 4, 8), "mixed": (2, 2, 12), "bf16": (2, 2, 4)}
    if precision not in table:
        raise ValueError(f"precision must be one of {sorted(table)}, got {precision!r}")
    w, g, o = table[precision]
    return {"weights": w * n_params, "gradients": g * n_params, "optimizer state": o * n_params}


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
    """Bytes one Block keeps under course.checkpointing's selective policy: its input (checkpoint),
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


RECOMPUTE = ("none", "full", "every-k", "sqrt", "selective", "core-attention")


def plan(n_layer: int, n_embd: int, n_head: int, seq_len: int, batch: int, policy: str = "none",
         k: int | None = None, bytes_per_el: int = 2, vocab: int = 50257, precision: str = "mixed",
         core: str = "sdpa", dropout: bool = False, device: str = "cuda") -> dict:
    """Memory and recompute cost of one GPT training step (analytic), for the planner widget.

    GiB of weights / gradients / optimizer state (`model_state_bytes`), activations kept after the
    forward pass and at the backward peak (what earlier segments keep + the segment in backward), and the extra
    compute as a fraction of a step (forward 24bsh² + 4bs²h per layer; a step is 3 forwards).
    full = every layer's forward again; every-k = 1/k of them; sqrt = all layers once (segments of
    ceil(sqrt L)); selective and core-attention = the attention core when it is written out (4bs²h per
    layer), else nothing (selective's pointwise ops are counted as 0).
    """
    if policy not in RECOMPUTE:
        raise ValueError(f"policy must be one of {RECOMPUTE}, got {policy!r}")
    for name, v in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("seq_len", seq_len),
                    ("batch", batch)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if policy == "every-k" and (not isinstance(k, int) or not 1 <= k <= n_layer):
        raise ValueError(f"k must be an integer with 1 <= k <= n_layer={n_layer} for 'every-k', got {k!r}")
    s, b, h, a, L = seq_len, batch, n_embd, n_head, n_layer
    kw = dict(bytes_per_el=bytes_per_el, core=core, dropout=dropout, device=device)
    layer = sum(layer_activation_bytes(s, b, h, a, **kw).values())
    x = s * b * h * bytes_per_el  # a block's input: what a checkpoint keeps
    # walk the segments like backward does: while segment j runs backward, segments before it still hold
    # what they kept, and j holds its full activations (recomputed if it was checkpointed)
    from course.checkpointing import segments_for  # local: checkpointing imports this module lazily

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
    if sel is not None:
        extra = 0.0 if fused else L * 4 * b * s * s * h / (3 * L * fwd_layer)
    else:
        extra = n_ckpt * fwd_layer / (3 * L * fwd_layer)
    n_params = 12 * L * h * h + vocab * h
    states = {name: v / 2**30 for name, v in model_state_bytes(n_params, precision).items()}
    return {
        "params": n_params,
        **states,
        "activations kept": kept / 2**30,
        "activations peak": peak / 2**30,
        "total": sum(states.values()) + peak / 2**30,
        "extra compute": extra,
    }


def measured_layer_bytes(n_embd: int, n_head: int, seq_len: int, batch: int, core: str = "sdpa",
                         dropout: float = 0.0, device=None, dtype=torch.float32) -> int:
    """Bytes one Block saves for backward, measured with `saved_tensors` on a 1-layer model (forward only)."""
    from course.model import MatmulAttention, ModelConfig, Transformer, set_attention

    if core not in ("sdpa", "matmul"):
        raise ValueError(f"core must be 'sdpa' or 'matmul', got {core!r}")
    cfg = ModelConfig.gpt(n_layer=1, n_head=n_head, n_embd=n_embd, block_size=seq_len, vocab_size=64,
                          dropout=dropout)
    model = Transformer(cfg).to(device=device, dtype=dtype)
    if core == "matmul":
        set_attention(model, lambda i: MatmulAttention())
    idx = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    report, _ = saved_tensors(model, lambda: model(idx)[0].sum())
    return report.under("blocks.0")
