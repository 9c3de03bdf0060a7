"""Measurement helpers, one of each: a device sync, a timer, a live-tensor tracker, a saved-tensor counter.

Every chapter and benchmark measures with these, so a number means the same thing everywhere.

- `sync(device)`: wait for queued GPU kernels before reading a clock (a no-op on CPU).
- `time_it(fn)`: wall time of fn(), the **minimum** of `repeats` calls after `warmup` calls. Other
  work on the machine only ever adds time, so the minimum is the least disturbed estimate of what
  the code itself costs (the one statistic every timing in the course uses).
- `LiveTensors`: a TorchDispatchMode that follows every tensor storage an op creates and subtracts
  it when the storage is freed (a weakref finalizer on the storage): the peak and a timeline of
  live bytes, including what backward allocates and recomputes. Works on CPU, where tracemalloc
  does not see tensor storage. `peak_memory(fn)` is its one-call form (torch.cuda's peak on GPU).
- `saved_tensors(model, fn)`: every tensor autograd saves for backward while `fn()` runs, through
  `torch.autograd.graph.saved_tensors_hooks`; counted once per storage (q, k, v are views of one
  c_attn output), parameters excluded, labelled by module and by the backward node that holds it.
  Caveat: inside a non-reentrant checkpoint region checkpoint installs its own hooks, which take
  precedence, so tensors held by checkpoint regions are invisible here: use `LiveTensors`.
- `measure_step(model, batch)`: one training step under LiveTensors, split into weights,
  gradients, optimizer state and activations at the peak.

Analytic counterparts of these measurements live in `course.costs`; tests compare the two.
"""
from __future__ import annotations

import math
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

# ----------------------------------------------------------------------------- clocks


def sync(device=None) -> None:
    """Wait for the device to finish queued work (CUDA kernels run asynchronously); CPU: nothing."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, repeats: int = 3, warmup: int = 1, device="cpu") -> float:
    """Seconds of one fn() call: the minimum of `repeats` timed calls after `warmup` untimed ones."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    for _ in range(warmup):
        fn()
    sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS (M_MMAP_THRESHOLD 1 GiB,
    M_TRIM_THRESHOLD 2 GiB). PyTorch's CPU allocator has no cache: by default every tensor over 32 MiB
    is a fresh mmap whose pages fault in on first touch, which here cost more than the matmuls.
    GPU runs get the same effect from the CUDA caching allocator. Affects every kernel in the process
    alike; returns False where it does not apply (not glibc)."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 31))  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


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


def peak_memory(fn, device="cpu") -> int:
    """Peak bytes of tensors created and alive at once while fn() runs (inputs made before: not counted).
    On CUDA: the allocator's peak above what was allocated before."""
    if torch.device(device).type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveTensors() as live:
        fn()
    return live.peak


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


# ----------------------------------------------------------------------------- model state held by a rank


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once; DTensor: local part)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "to_local"):  # DTensor (FSDP2): what this rank holds
            t = t.to_local()
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state (AdamW's per-element m and v) this rank holds.

    Sharded models (course ZeRO) report their own storages through `model.state_tensors()`; plain,
    DDP-wrapped and FSDP2 models are read from model.parameters() (DTensor: the local shard)."""
    if hasattr(model, "state_tensors"):
        held = model.state_tensors()
        params, grads = held["params"], held["grads"]
    else:
        params = list(model.parameters())
        grads = [p.grad for p in params]
    opt = []
    if optimizer is not None:
        for p, st in optimizer.state.items():
            opt += [v for v in st.values() if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape]
    out = {"params": storage_bytes(params), "grads": storage_bytes(grads), "optimizer": storage_bytes(opt)}
    out["total"] = sum(out.values())
    return out
