# %% [markdown]
# # 11 · FlashAttention: exact attention that never stores the s×s matrix
#
# Lesson 04 measured where a training step's activation memory goes. With attention written out, each
# layer keeps its s×s score-sized tensors (the softmax output, the dropout mask and the dropped
# probabilities), which Korthikanti et al. (2022) count as 5·a·s/h of the 34 + 5·a·s/h bytes per s·b·h.
# Their **selective recomputation** (§5) drops exactly these tensors and recomputes them in backward.
#
# **FlashAttention** (Dao et al. 2022; FlashAttention-2, Dao 2023) never stores them at all. It
# computes attention tile by tile with an *online softmax*, keeps only the output and one
# log-sum-exp per query row (FlashAttention-2, Dao 2023 §3.1.1; the first version kept the row max m and
# the sum ℓ separately, Dao et al. 2022 Algorithm 1), and its backward recomputes each tile of scores
# from q, k and that log-sum-exp. On a GPU that is what makes it fast as well as small: the tiles live in the
# multiprocessors' on-chip SRAM, and the s×s scores never travel to and from the large but much slower
# high-bandwidth memory (HBM) — Dao et al. (2022, §2.1, §3.1) call it IO-aware. On a CPU there is no
# such split worth the name, so here the memory saving is what we can measure. In this lesson you will
# 1. follow the online softmax one tile at a time and see why no s×s tensor is needed;
# 2. check `course.flash`, FlashAttention-2's Algorithms 1 and 2 in plain PyTorch, against
#    PyTorch's `scaled_dot_product_attention`;
# 3. measure what one block saves for backward as T grows: O(T) against O(T²), matched to the formula;
# 4. time it against PyTorch's fused kernel;
# 5. use it as a recomputation policy and place it on lesson 04's memory/time axes;
# 6. see why FlashAttention made selective recomputation largely unnecessary.
#
# The library: `course/flash.py` (the kernel, the `FlashAttention` core), the `"flash"` policy in
# `course/recompute.py`, `flash_layer_bytes` in `course/costs.py`; the figures are in
# `course/lessons/flash.py`.

# %%
import math

import torch
import torch.nn.functional as F
from IPython.display import Markdown

from course.costs import flash_layer_bytes, layer_activation_bytes
from course.data import load_dataset
from course.device import profile
from course.flash import FlashAttention, dropout_keep, flash_attention
from course.lessons import flash as lesson
from course.lessons.recompute import measure_policies
from course.measure import time_it
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention
from course.recompute import plan

prof = profile()
threads = 1 if prof.device.type == "cpu" else None  # steadier CPU timings on a shared machine
prof

# %% [markdown]
# ## 1. Softmax, one tile of keys at a time
#
# One query row has scores $s_1, \dots, s_T$. The softmax $p_j = e^{s_j - m} / \ell$ needs the row's
# maximum $m$ and its sum $\ell = \sum_j e^{s_j - m}$, which seems to require the whole row. The online
# softmax (Milakov & Gimelshein 2018; FlashAttention §3.1) reads the keys one tile at a time, keeping a
# running max $m$ and a running sum $\ell$. When a tile raises the max from $m$ to $m'$, everything
# summed so far is rescaled by $e^{m - m'}$:
#
# $$m' = \max(m, \max_{j \in \text{tile}} s_j), \qquad \ell' = e^{m - m'}\,\ell + \sum_{j \in \text{tile}} e^{s_j - m'}.$$
#
# The output accumulator $O = \sum_j e^{s_j - m} v_j$ is rescaled the same way, so after the last tile
# $O / \ell$ is the exact attention output. Backward needs only $L = m + \log \ell$, one number per row:
# it can rebuild any tile's probabilities as $p_j = e^{s_j - L}$.

# %%
# NBVAL_CHECK_OUTPUT
row = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3  # one query's scores
trace, probs = lesson.online_softmax_trace(row, block=8)
for t in trace:
    print(f"after key tile {t['tile']}: tile max {t['tile_max']:6.3f}   running max m {t['m']:6.3f}   running sum l {t['l']:8.4f}")
# float64: the two differ only in rounding (about 40 terms of 2^-53 each), far below 1e-12
assert torch.allclose(probs, torch.softmax(row, 0), rtol=0, atol=1e-12)

# %% [markdown]
# The picture of the whole kernel: the T×T score matrix is cut into tiles of `block_q` queries by
# `block_k` keys. FlashAttention-2's forward (Algorithm 1) gives each query tile its own running
# $m$, $\ell$ and $O$ and sweeps over the key tiles; only one tile of scores exists at any time.
# With causal attention the tiles above the diagonal hold no kept pair and are skipped, which is half
# the work. A block-sparse layout (lesson 03) skips its dropped tiles the same way.

# %%
# NBVAL_IGNORE_OUTPUT
fig = lesson.draw_tiling(T=20, block_q=4, block_k=4, row_tile=3)

# %% [markdown]
# The right panel follows one query row of the orange tile: the running max only grows, and each time it
# grows, the running sum is scaled down before the new tile's terms are added.
#
# Backward (Algorithm 2) loops the other way round: key tiles outer, query tiles inner. For each tile it
# recomputes $S = QK^\top/\sqrt{d}$ and $P = e^{S - L}$ from the saved q, k and L, then accumulates
# $dV \mathrel{+}= P^\top dO$, $dS = P \circ (dO\,V^\top - D)$ with $D = \mathrm{rowsum}(dO \circ O)$,
# $dQ \mathrel{+}= dS\,K/\sqrt{d}$ and $dK \mathrel{+}= dS^\top Q/\sqrt{d}$ (Dao 2023 writes Algorithm 2 with
# the $1/\sqrt{d}$ folded into $Q$; `course/flash.py` does the same). That is one more matmul per tile than
# attention that stores P, and no s×s memory.

# %% [markdown]
# ## 2. The kernel, checked against PyTorch's attention
#
# `flash_attention(q, k, v, causal, block_q, block_k)` is a `torch.autograd.Function`. It saves q, k, v,
# the output O and L, and nothing of size s². We compare its output and its three gradients with
# `F.scaled_dot_product_attention` in float64. T = 100 is not a multiple of either tile size.

# %%
# NBVAL_CHECK_OUTPUT
g = torch.Generator().manual_seed(1)
q, k, v = (torch.randn(2, 4, 100, 16, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
dout = torch.randn(2, 4, 100, 16, generator=g, dtype=torch.float64)
for causal in (False, True):
    for bq, bk in ((32, 32), (24, 40)):
        out = flash_attention(q, k, v, causal, block_q=bq, block_k=bk)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        got, want = torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)
        err = max((a - b).abs().max().item() for a, b in zip((out, *got), (ref, *want)))
        print(f"causal={causal!s:5}  tiles {bq}x{bk}: output and dq, dk, dv equal to SDPA (max |diff| < 1e-12)")
        assert err < 1e-12  # float64: only the order of the sums differs (tests/test_flash.py)

# %% [markdown]
# ## 3. What one block saves for backward, against sequence length
#
# We build one block of the lesson's model with each attention core and count the bytes autograd saves
# (`course.measure.saved_tensors`, a forward pass only), with dropout 0.1 as in Korthikanti et al.'s
# accounting (their 34 + 5as/h counts the dropout masks).
# The written-out core keeps three a·s² tensors. The flash core keeps q, k, v (views of the `c_attn`
# output), O and L. Its dropout mask is not stored: backward regenerates it from a seed and the
# coordinates, with a counter-based hash (`course/flash.py` explains how). The formulas are
# `course.costs.flash_layer_bytes` and `layer_activation_bytes(core="matmul")`.

# %%
# NBVAL_CHECK_OUTPUT
C, H = prof.n_embd, prof.n_head
seqs = [128, 256, 512, 1024]
layer = lesson.layer_bytes_vs_T(seqs, C, H, batch=1, dropout=0.1, device=prof.device)
for T, f, w in zip(seqs, layer["flash"], layer["written"]):
    print(f"T={T:5d}: flash core {f / 2**20:7.2f} MiB, written-out core {w / 2**20:8.2f} MiB per block")
assert layer["flash"] == layer["flash formula"] and layer["written"] == layer["written formula"]  # to the byte
assert all(b == 2 * a for a, b in zip(layer["flash"], layer["flash"][1:]))  # exactly linear in T

# %% [markdown]
# ## 4. Time against PyTorch's fused kernel
#
# PyTorch's SDPA on CPU is itself a FlashAttention-style kernel written in C++
# (`aten._scaled_dot_product_flash_attention_for_cpu`). Ours issues a few PyTorch ops per tile, so
# large tiles amortise the Python overhead: `lesson.auto_block(T)` takes 256×256, or T/8 when that leaves
# too few tiles per row. We time forward + backward of one causal attention call (batch 1, 8 heads of
# 64, fp32) in interleaved rounds on one CPU thread and keep the fastest.

# %%
# NBVAL_IGNORE_OUTPUT
Ts = [512, 1024, 2048] if prof.device.type == "cpu" else [1024, 2048, 4096, 8192]
times = lesson.kernel_times(Ts, batch=1, n_head=8, head_dim=64, causal=True, rounds=2, device=prof.device,
                            progress=True, threads=threads)
fig = lesson.plot_scaling(times, layer)

# %%
# NBVAL_IGNORE_OUTPUT
big, r = Ts[-1], times[Ts[-1]]
Markdown(f"At T = {big} our kernel takes **{r['flash_s']:.2f} s** for forward + backward against SDPA's "
         f"**{r['sdpa_s']:.2f} s** ({r['ratio']:.2f}×). Both save {r['flash_saved'] / 2**20:.1f} MiB for backward; "
         f"SDPA given the causal mask as a tensor saves {r['sdpa_mask_saved'] / 2**20:.1f} MiB, because it keeps "
         f"that T×T mask as a float bias. On the right, the flash block grows by exactly 2× per doubling of T, "
         f"and the written-out block by up to "
         f"{layer['written'][-1] / layer['written'][-2]:.2f}× at the longest T (the s² terms take over).")

# %%
assert all(t["flash_saved"] == t["sdpa_saved"] for t in times.values())  # same tensors: q, k, v, O, L
assert all(t["sdpa_mask_saved"] - t["flash_saved"] == 4 * T * T for T, t in times.items())  # + a float T x T mask

# %% [markdown]
# `benchmarks/flash_attention.py` runs the same comparison up to T = 8192, with dropout too. The GPU
# reference, when one has been recorded, is printed below. On a GPU a plain-PyTorch kernel launches a
# few small kernels per tile, so it cannot match a fused CUDA kernel; there the point is the memory.

# %%
from course.reference import describe, gpu_reference

print(describe("flash_attention"))
ref = gpu_reference("flash_attention")
if ref is not None:
    for name, t in ref["targets"].items():
        print(f"  {name:34s} measured {t['measured']}   target {t['target']}   met: {t['met']}")

# %% [markdown]
# ## 5. As a recomputation policy, on lesson 04's axes
#
# `apply_policy(model, "flash")` (or `Plan(recompute="flash")`) swaps every block's attention core for
# `FlashAttention`. The weights and the state_dict stay the same, and a block-sparse core keeps its
# pattern. We measure it next to lesson 04's policies in the paper's setting: the profile's model with
# attention written out (`MatmulAttention`) and dropout 0.1. So "none" is the written-out model as is,
# and "flash" is the same model with the flash core instead. `none#control` is an identical copy of
# "none": its ratio shows the machine's timing noise. The green box is this chapter's own target (≥ 40%
# of the activations saved at ≤ 1.10× the step time, set in `benchmarks/flash_attention.py`, not taken from
# a paper); the dotted line is the step time of no recomputation.

# %%
# NBVAL_IGNORE_OUTPUT
data = load_dataset("char")
B, T, L = prof.batch_size, prof.block_size, prof.n_layer
batch = data.batch("train", B, T, generator=torch.Generator().manual_seed(0), device=prof.device)
cfg = ModelConfig.gpt(n_layer=L, n_head=H, n_embd=C, block_size=T, vocab_size=data.tokenizer.vocab_size, dropout=0.1)


def make_written_out():
    torch.manual_seed(0)
    m = Transformer(cfg).to(prof.device)
    return set_attention(m, lambda i: MatmulAttention())


results = measure_policies(make_written_out, batch, ("none", "full", "selective", "core-attention", "flash", "none#control"),
                           rounds=3, progress=True, threads=threads)
fig = lesson.plot_policies(results, f"written-out attention, dropout 0.1, {L} layers, batch {B} x {T}")

# %%
# NBVAL_IGNORE_OUTPUT
res = {r.policy: r for r in results}
fl, ca, ctl = res["flash"], res["core-attention"], res["none#control"]
faster = fl.time_ratio < ca.time_ratio
Markdown(f"The flash policy keeps **{fl.activations / 2**20:.1f} MiB** instead of {res['none'].activations / 2**20:.1f} MiB "
         f"(**{1 - fl.memory_ratio:.0%} saved**) at **{fl.time_ratio:.2f}×** the step time of no recomputation "
         f"(the identical control model measured {ctl.time_ratio:.2f}×). Korthikanti's core-attention policy saves "
         f"{1 - ca.memory_ratio:.0%} at {ca.time_ratio:.2f}×, {'slower than flash here' if faster else 'no slower than flash in this run'}. "
         f"It recomputes the whole written-out core in backward, including the dropout mask, drawn again with "
         f"`bernoulli_`; the flash kernel recomputes only QKᵀ per tile, regenerates its mask with a vectorized hash, "
         f"and skips the causal upper half of the tiles.")

# %%
kind = "cuda" if prof.device.type == "cuda" else "cpu"
written = sum(layer_activation_bytes(T, B, C, H, core="matmul", dropout=True, device=kind).values())
kept = sum(flash_layer_bytes(T, B, C, H, dropout=True, device=kind).values())
assert res["none"].activations - fl.activations == L * (written - kept)  # exactly the s*s terms, every layer
assert fl.activations - ca.activations == L * B * H * T * 4  # what core-attention keeps + the log-sum-exp

# %%
# NBVAL_IGNORE_OUTPUT
scores = torch.empty(B, H, T, T, device=prof.device)  # one layer's (B, H, T, T) mask, drawn both ways
t_hash = time_it(lambda: dropout_keep(0, B, H, T, 0.1, device=prof.device), repeats=5, device=prof.device)
t_bern = time_it(lambda: scores.bernoulli_(0.9), repeats=5, device=prof.device)
Markdown(f"Is the hash what makes it cheap? One layer's mask ({B}×{H}×{T}×{T}) built densely by the kernel's "
         f"counter-based hash takes {t_hash * 1e3:.1f} ms, by `bernoulli_` {t_bern * 1e3:.1f} ms "
         f"({t_hash / t_bern:.1f}×): the hash is {'faster' if t_hash < t_bern else 'not faster'} here. What it buys "
         f"is memory and state: no mask is stored, and the same seed gives the same mask at any tile size.")

# %%
def s2_share(s, h, a):  # share of a written-out layer's saved bytes that are the s×s terms (measured = formula above)
    w = sum(layer_activation_bytes(s, 1, h, a, core="matmul", dropout=True, device=kind).values())
    return (w - sum(flash_layer_bytes(s, 1, h, a, dropout=True, device=kind).values())) / w


Markdown(f"At this shape (s = {T}, h = {C}, {H} heads: 5as/h = {5 * H * T / C:g}) the s×s terms are "
         f"{s2_share(T, C, H):.0%} of a written-out layer; at GPT-3 175B's (s = 2048, h = 12288, 96 heads: "
         f"5as/h = {5 * 96 * 2048 / 12288:g}, Brown et al. 2020, Table 2.1) they are {s2_share(2048, 12288, 96):.0%} "
         f"in this accounting (Korthikanti et al. 2022, §5: 70% in 16-bit). "
         f"`benchmarks/flash_attention.py` measures the same comparison at a larger share than here (h = 1024, "
         f"16 heads, s = 512: 5as/h = 40, {s2_share(512, 1024, 16):.0%}), against the course's own target of ≥ 40% "
         f"of activation memory saved at ≤ 1.10× the step time (a goal set for this chapter, not a published number).")

# %% [markdown]
# ## 6. Why FlashAttention made selective recomputation largely unnecessary
#
# Korthikanti et al. (2022, §5) noticed that the attention core's s×s activations are the largest and
# the cheapest to recompute, and recomputed only them. A FlashAttention kernel does that recomputation
# inside its own backward, tile by tile, and never writes the s×s tensors to memory (Dao et al. 2022,
# §3.1; Dao 2023, Algorithm 2). So a model with a flash kernel already keeps what selective recomputation
# keeps, and the selective policy has nothing left to drop. Under a fused kernel, `core-attention` keeps
# every byte it kept before (`course.costs.core_attention_layer_bytes`, checked against a measurement in
# `tests/test_memory.py`). The planner shows the same at GPT-3 175B scale: 16-bit, one 2,048-token
# sequence, attention written out for "none" and "core-attention".

# %%
# NBVAL_CHECK_OUTPUT
for policy in ("none", "core-attention", "flash", "full"):
    p = plan(96, 12288, 96, 2048, 1, policy, dropout=True, core="matmul")
    print(f"GPT-3 175B, {policy:15s}: activations kept {p['activations kept']:6.1f} GiB, "
          f"extra compute {p['extra compute']:5.1%}")
flash_plan = plan(96, 12288, 96, 2048, 1, "flash", dropout=True, core="matmul")
core_plan = plan(96, 12288, 96, 2048, 1, "core-attention", dropout=True, core="matmul")
lse = 96 * 96 * 2048 * 4  # one float32 log-sum-exp per query row, head and layer
assert (flash_plan["activations kept"] - core_plan["activations kept"]) * 2**30 == lse  # exact in these sums
assert flash_plan["extra compute"] == core_plan["extra compute"] / 2  # QK^T only, not QK^T and PV

# %% [markdown]
# The flash kernel keeps what selective recomputation keeps plus one float32 log-sum-exp per query row
# and head (the small difference printed above), and it recomputes only QKᵀ (2·b·s²·h FLOPs per layer),
# half of what recomputing the written-out core costs (QKᵀ and the product with V). "Extra compute" here is
# those matmul FLOPs over the step's forward + backward FLOPs; Korthikanti et al. (§5) quote 2.7% for
# selective recomputation of GPT-3 from their hardware-FLOPs formula, which lesson 04 reproduces and compares
# with this count.
#
# ## What to remember
#
# - Softmax can be computed one tile at a time: keep a running max and sum and rescale when the max grows.
#   Only the output and one log-sum-exp per query row have to survive until backward.
# - FlashAttention-2's backward recomputes each score tile from q, k and L. Memory per layer drops from
#   O(s²) to O(s) (measured here to the byte), at the price of one extra QKᵀ per tile.
# - Dropout fits too: regenerate the mask from a seed and the tile coordinates with a counter-based generator.
#   It saves the mask's memory and makes the mask independent of the tiling; it is not faster than drawing
#   `bernoulli_` again (measured in section 5).
# - Causal and block-sparse attention skip whole tiles, so they save time as well as memory.
# - With a flash kernel, Korthikanti's selective recomputation has nothing left to drop. What remains
#   is the O(s·b·h) activations that full or √n checkpointing trade for compute (lesson 04).

# %% [markdown]
# ## Your turn
#
# 1. Change `block_q` and `block_k` (16 to 512) at T = 2048 and time the kernel. Where does Python overhead
#    per tile stop mattering, and where do tiles stop fitting in the cache?
# 2. Give the flash core a `sliding_window` or `bigbird` pattern from `course.sparse` and measure time
#    against T. Check that the computed tiles (`course.flash.computed_tiles`) predict the speed-up.
# 3. Run `flash_attention` with dropout 0.1 and one seed at two tile sizes, then write dense attention that
#    multiplies by `course.flash.dropout_keep(seed, ...)`. Show that all three agree: the mask depends on the
#    seed and the coordinates, never on the tiling.
# 4. Combine `Plan(attention=lambda i: FlashAttention(), recompute="sqrt")`. Measure what √n checkpointing
#    still saves once the s×s terms are gone.
