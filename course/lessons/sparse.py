"""Lesson 03 (sparse attention): figures, the explorer widget and the kernel experiments it runs.

The technique lives in `course.sparse`; this module only draws and measures it for the lesson and
benchmarks/sparse_attention.py (dense masked SDPA vs the block-sparse kernel vs FlexAttention).
"""
from __future__ import annotations

from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from ..measure import peak_memory, time_it
from ..progress import progress_bar
from ..sparse.block_sparse import BlockSparseAttention, block_sparse_attention, plan, sparse_attention_maps
from ..sparse.cost import attention_cost
from ..sparse.patterns import PATTERNS, SparsePattern, make_pattern

GALLERY = ("causal", "sliding_window", "dilated", "global_tokens", "random_blocks", "bigbird", "longformer",
           "strided", "fixed")


def plot_pattern(p: SparsePattern, ax=None, head: int = 0, title: str | None = None):
    """The element mask of one head (kept = dark), with the block grid the kernel computes on."""
    ax = ax or plt.subplots(figsize=(3.2, 3.2))[1]
    m = p.dense_mask()[min(head, p.n_heads - 1)].float()
    tiles = p.layout[min(head, p.n_heads - 1)].repeat_interleave(p.block_size, 0).repeat_interleave(p.block_size, 1)
    tiles = tiles[:p.seq_len, :p.seq_len].float()
    ax.imshow((0.25 * tiles + 0.75 * m).numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title or f"{p.name}\n{p.density():.1%} of scores, {p.block_density():.0%} of tiles", fontsize=8)
    ax.set_xlabel("key position", fontsize=8)
    ax.set_ylabel("query position", fontsize=8)
    ax.tick_params(labelsize=7)
    return ax


def gallery(seq_len: int = 512, block_size: int = 32, names=GALLERY, **kw):
    """Every pattern side by side (grey = computed tile, black = kept element)."""
    fig, axes = plt.subplots(2, (len(names) + 1) // 2, figsize=(2.7 * ((len(names) + 1) // 2), 6))
    for ax, name in zip(axes.flat, names):
        plot_pattern(make_pattern(name, seq_len, block_size, **kw), ax)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def explore(pattern: str = "bigbird", seq_len: int = 1024, block_size: int = 64, window: int = 3,
            n_global: int = 2, n_random: int = 3, seed: int = 0, n_heads: int = 4, head_dim: int = 64):
    """Mask, density and cost of one configuration -> (figure, AttentionCost). The explorer widget calls this."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    p = make_pattern(pattern, seq_len, block_size, window, n_global, n_random, n_heads=1, seed=seed)
    cost = attention_cost(p, n_heads, head_dim)
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.6))
    plot_pattern(p, a)
    lens, costs = [], []
    for T in (seq_len // 2, seq_len, seq_len * 2, seq_len * 4):  # lengths too short for the knobs are skipped
        try:
            costs.append(attention_cost(make_pattern(pattern, T, block_size, window, n_global, n_random, seed=seed),
                                        n_heads, head_dim))
            lens.append(T)
        except ValueError:
            pass
    b.loglog(lens, [c.dense_flops / 1e9 for c in costs], "o-", label="dense")
    b.loglog(lens, [c.sparse_flops / 1e9 for c in costs], "s-", label="block-sparse tiles")
    _length_ticks(b, lens)
    b.set_xlabel("sequence length (tokens)")
    b.set_ylabel("attention fwd+bwd (GFLOP)")
    b.set_title(f"{n_heads} heads, head dim {head_dim}", fontsize=9)
    b.legend(fontsize=8)
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig, cost


def explorer():
    """ipywidgets explorer around `explore` (pattern, length, block size, window, globals, randoms)."""
    import ipywidgets as w

    def show(pattern, log2_len, block_size, window, n_global, n_random, seed):
        try:
            fig, cost = explore(pattern, 2 ** log2_len, block_size, window, n_global, n_random, seed)
            plt.show()
            print(cost)
        except ValueError as e:  # e.g. more random blocks than exist: say so instead of a blank cell
            print(f"not possible: {e}")
    return w.interactive(show, pattern=w.Dropdown(options=PATTERNS, value="bigbird"),
                         log2_len=w.IntSlider(value=10, min=8, max=12, description="log2 T"),
                         block_size=w.Dropdown(options=[16, 32, 64, 128], value=64),
                         window=w.IntSlider(value=3, min=1, max=9, step=2),
                         n_global=w.IntSlider(value=2, min=0, max=4), n_random=w.IntSlider(value=3, min=0, max=6),
                         seed=w.IntText(value=0))


def _length_ticks(ax, lengths):
    """Readable log-axis ticks: the measured lengths themselves, no minor labels."""
    ax.set_xticks(list(lengths), [f"{int(t):,}" for t in lengths], fontsize=7)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())


def plot_scaling(rows: list[dict], make, n_heads: int = 4, head_dim: int = 64, flex: dict | None = None):
    """Measured time and peak memory vs length (log-log), with FLOP-proportional theory curves
    anchored at the longest measured point of each kernel; forward-only times on a panel of their own."""
    T = np.array([r["seq_len"] for r in rows])
    cost = [attention_cost(make(int(t)), n_heads, head_dim) for t in T]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.9), gridspec_kw={"width_ratios": [1.2, 1.2, 0.9]})
    for key, flops_key, label, mark in (("dense_s", "dense_flops", "dense masked SDPA", "o"),
                                        ("sparse_s", "sparse_flops", "block-sparse (ours)", "s")):
        have = [i for i, r in enumerate(rows) if key in r]
        t, y = T[have], np.array([rows[i][key] for i in have])
        f = np.array([getattr(cost[i], flops_key) for i in have])
        line, = a.loglog(t, y, mark + "-", label=f"{label}, measured")
        a.loglog(t, f * y[-1] / f[-1], ":", color=line.get_color(), label=f"{label}, ∝ FLOPs")
    a.set_xlabel("sequence length (tokens)")
    a.set_ylabel("forward + backward time (s)")
    a.legend(fontsize=7)
    for key, label, mark in (("dense_peak_bytes", "dense masked SDPA", "o"),
                             ("sparse_peak_bytes", "block-sparse", "s")):
        have = [r for r in rows if key in r]
        if have:
            b.loglog([r["seq_len"] for r in have], [r[key] / 2**20 for r in have], mark + "-", label=f"{label}, measured")
    b.loglog(T, [cb.dense_score_bytes / 2**20 for cb in cost], ":", label="T² score matrix, forward (theory)")
    b.loglog(T, [cb.sparse_bytes / 2**20 for cb in cost], "--", label="kept tiles + gathered K,V, forward (theory)")
    b.set_xlabel("sequence length (tokens)")
    b.set_ylabel("peak memory of fwd + bwd (MiB)")
    b.legend(fontsize=7)
    c.loglog(T, [r["sparse_fwd_s"] for r in rows], "s-", color="C1", label="block-sparse (ours)")
    if flex:
        c.loglog(list(flex), list(flex.values()), "^", ms=9, color="C2", label="compiled FlexAttention")
    c.set_xlabel("sequence length (tokens)")
    c.set_ylabel("forward-only time (s)")
    c.legend(fontsize=7)
    for ax in (a, b, c):
        _length_ticks(ax, T)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def scaling_summary(rows: list[dict], make, n_heads: int = 4, head_dim: int = 64) -> dict:
    """What the prose of the scaling section says, from the measurement: crossover, shortest length's
    tile share and speed ratio, longest length's speed and memory ratios."""
    both = [r for r in rows if "dense_s" in r]
    first, last = both[0], both[-1]
    return {"crossover": crossover(rows), "first_T": first["seq_len"],
            "first_tiles": attention_cost(make(first["seq_len"]), n_heads, head_dim).density,
            "first_speedup": first["dense_s"] / first["sparse_s"], "last_T": last["seq_len"],
            "last_speedup": last["dense_s"] / last["sparse_s"],
            "last_memory_ratio": last["dense_peak_bytes"] / last["sparse_peak_bytes"]}


def sparse_gpt(config, make_pattern_for_layer):
    """A course Transformer whose layer i uses BlockSparseAttention(make_pattern_for_layer(i))."""
    from ..model import Transformer, set_attention
    model = Transformer(config)
    return set_attention(model, lambda i: BlockSparseAttention(make_pattern_for_layer(i)))


def attention_distance(maps: torch.Tensor) -> torch.Tensor:
    """Mean |query - key| distance under the attention weights, per layer and head: (L, H)."""
    T = maps.size(-1)
    pos = torch.arange(T, dtype=maps.dtype)
    dist = (pos.view(-1, 1) - pos.view(1, -1)).abs()  # (T, T)
    return (maps * dist).sum(-1).mean(dim=(1, 3))  # (L, H)


# ----------------------------------------------------------------------------- kernel experiments


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
        from ..sparse.flex import block_mask, flex_forward
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
    it = progress_bar(seq_lens, desc="sequence lengths", enabled=progress)
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
