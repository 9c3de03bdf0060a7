"""Measuring attention kernels: wall time and peak live tensor memory, on CPU or GPU.

Memory on CPU: tracemalloc does not see tensor storage, so `LiveMemory` is a TorchDispatchMode
that records every storage an op creates (by weak reference) and drops it when it dies: its
`peak` is the most bytes of tensors alive at once, created inside the `with` block, forward and
backward included (the inputs made before are not counted). On GPU, torch.cuda's peak stats agree.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .block_sparse import block_sparse_attention, plan
from .patterns import SparsePattern


class LiveMemory(TorchDispatchMode):
    """with LiveMemory() as mem: ...; mem.peak -> bytes of tensor storage alive at once (created inside)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key = st._cdata
                if key not in self.live:
                    self.live[key] = (StorageWeakRef(st), st.nbytes())
                    self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out

    def _sweep(self):
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]

    def __exit__(self, *exc):
        self._sweep()
        return super().__exit__(*exc)


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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, repeats: int = 3, warmup: int = 1, device="cpu") -> float:
    """Best wall time of `repeats` calls, in seconds (best-of: other processes only ever add time)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_memory(fn, device="cpu") -> int:
    """Peak bytes of tensors created and alive at once while fn() runs."""
    if torch.device(device).type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    with LiveMemory() as mem:
        fn()
    return mem.peak


@dataclass
class Kernels:
    """The three ways to run one pattern on q, k, v: dense masked SDPA, block-sparse, (flex)."""
    pattern: SparsePattern
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def make(cls, pattern: SparsePattern, n_heads=4, head_dim=64, batch=1, device="cpu", dtype=torch.float32, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        shape = (batch, n_heads, pattern.seq_len, head_dim)
        q, k, v = (torch.randn(shape, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        return cls(pattern, q, k, v)

    def _grads_off(self):
        for t in (self.q, self.k, self.v):
            t.grad = None

    def dense_fwd_bwd(self):
        """Dense SDPA with the equivalent boolean mask (the mask is built once and cached)."""
        if not hasattr(self, "_mask"):
            self._mask = self.pattern.dense_mask(self.q.size(1)).to(self.q.device)
        self._grads_off()
        F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self._mask).sum().backward()

    def sparse_fwd_bwd(self):
        self._sparse(True)

    def sparse_fwd(self):
        with torch.no_grad():
            self._sparse(False)

    def _sparse(self, backward):
        p = self.pattern
        if not hasattr(self, "_plan"):
            self._plan = plan(p.layout.to(self.q.device), self.q.size(1), p.causal)
        self._grads_off()
        out = block_sparse_attention(self.q, self.k, self.v, p.layout, p.block_size, causal=p.causal,
                                     mask_mod=None if p.block_exact else p.mask_mod, _plan=self._plan)
        if backward:
            out.sum().backward()

    def flex_fwd(self, backward=False):
        from .flex import block_mask, flex_forward
        if not hasattr(self, "_bmask"):
            self._bmask = block_mask(self.pattern, device=self.q.device)
        self._grads_off()
        q, k, v = (t if backward else t.detach() for t in (self.q, self.k, self.v))  # CPU flex: forward only
        with torch.set_grad_enabled(backward):
            out = flex_forward(q, k, v, self._bmask)
            if backward:
                out.sum().backward()


def sweep(make_pattern, seq_lens, dense_up_to: int | None = None, n_heads=4, head_dim=64, device="cpu",
          repeats: int = 3, memory: bool = True, progress: bool = False) -> list[dict]:
    """Time (and peak memory) of dense vs block-sparse fwd+bwd for each length: list of dicts, one per T."""
    rows = []
    it = seq_lens
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(seq_lens, desc="sequence lengths")
    for T in it:
        kern = Kernels.make(make_pattern(T), n_heads, head_dim, device=device)
        row = dict(seq_len=T, sparse_s=time_it(kern.sparse_fwd_bwd, repeats, device=device),
                   sparse_fwd_s=time_it(kern.sparse_fwd, repeats, device=device))
        if memory:
            row["sparse_peak_bytes"] = peak_memory(kern.sparse_fwd_bwd, device)
        if dense_up_to is None or T <= dense_up_to:
            row["dense_s"] = time_it(kern.dense_fwd_bwd, repeats, device=device)
            if memory:
                row["dense_peak_bytes"] = peak_memory(kern.dense_fwd_bwd, device)
        rows.append(row)
        del kern
    return rows


def crossover(rows: list[dict]) -> int | None:
    """Shortest measured length from which block-sparse fwd+bwd beats dense at every longer one."""
    both = [r for r in rows if "dense_s" in r]
    win = None
    for r in reversed(both):
        if r["sparse_s"] < r["dense_s"]:
            win = r["seq_len"]
        else:
            break
    return win
