# %% [markdown]
# # 03 · Sparse attention: which scores to skip, and what skipping really buys
#
# Dense attention scores every query against every key: $T^2$ entries per head, in time **and** memory.
# At GPT-3's 2,048 tokens that is fine; at 16k or 64k tokens it dominates everything.
# Sparse attention keeps only a pattern of (query, key) pairs.
#
# Two stories get mixed up, so let us keep them apart:
#
# * **GPT-3** (Brown et al. 2020, §2.1) used "alternating dense and locally banded sparse attention
#   patterns in the layers of the transformer, similar to the Sparse Transformer" (Child et al. 2019):
#   every other layer is dense, the others see only a local band.
# * **"Local windows + global blocks + random blocks"** is **BigBird** (Zaheer et al. 2020), an encoder
#   pattern: a 3-block window, 2 global blocks and 3 random blocks per query block of 64 tokens.
#
# This lesson draws both (and Longformer, dilated, Sparse Transformer *strided* / *fixed*), runs them
# through a block-sparse kernel written in plain PyTorch that trains on a CPU (FlexAttention has no
# backward on CPU), measures when sparsity actually wins, and trains a tiny GPT with GPT-3's pattern.

# %%
import matplotlib.pyplot as plt
import torch

from course.device import profile
from IPython.display import Markdown

from course import measure
from course import sparse as sa
from course.lessons import sparse as lesson
from course.sparse.cost import attention_cost

prof = profile()
measure.keep_freed_memory()  # CPU: reuse freed pages instead of page-faulting each big tensor (see section 4)
prof

# %% [markdown]
# ## 1. The patterns
#
# Every pattern in `course.sparse` is one definition exposed three ways: a per-element
# `mask_mod(b, h, q, k)` (the exact rule, FlexAttention's signature), a block `layout`
# `[heads, n_blocks, n_blocks]` (the tiles a kernel computes), and a FlexAttention `BlockMask`
# built from that layout. In the pictures, black is a kept (query, key) pair and grey a tile the
# block kernel computes anyway; block-native patterns (BigBird, random) have no grey at all.

# %%
# NBVAL_IGNORE_OUTPUT
fig = lesson.gallery(seq_len=512, block_size=32)

# %% [markdown]
# The Sparse Transformer rules are easy to get subtly wrong, so check them on 6 tokens against
# Child et al.'s definitions: *strided* with stride $l$ keeps $A^{(1)}_i=\{\max(0,i-l),\dots,i\}$ and
# $A^{(2)}_i=\{j:(i-j)\bmod l=0\}$; *fixed* keeps the query's own stride block and the last $c$ positions
# of every block.

# %%
# NBVAL_CHECK_OUTPUT
strided6 = sa.strided(6, stride=2, block_size=1).dense_mask()[0]
fixed6 = sa.fixed(6, stride=3, c=1, block_size=1).dense_mask()[0]
print("strided l=2, query 5 sees", strided6[5].nonzero().flatten().tolist())
print("fixed l=3 c=1, query 4 sees", fixed6[4].nonzero().flatten().tolist())
assert strided6[5].nonzero().flatten().tolist() == [1, 3, 4, 5]  # {3,4,5} from A1, {1,3,5} from A2
assert fixed6[4].nonzero().flatten().tolist() == [2, 3, 4]  # own block {3,4}, summary column 2

# %% [markdown]
# ## 2. Explore a pattern and its cost
#
# Pick a pattern and its knobs (all counted in blocks, as BigBird does). The left panel is the mask,
# the right one the attention FLOPs of a forward+backward pass, dense vs the kept tiles, as the length
# grows. Dense grows as $T^2$; a pattern with a fixed number of blocks per row grows as $T$.

# %%
# NBVAL_IGNORE_OUTPUT
lesson.explorer()

# %% [markdown]
# The same function without the widget, for BigBird's defaults at 4,096 tokens:

# %%
# NBVAL_CHECK_OUTPUT
fig, cost = lesson.explore("bigbird", seq_len=4096, block_size=64, window=3, n_global=2, n_random=3)
print(cost)
assert cost.flop_ratio > 4  # 2 global rows are dense, every other row keeps 8 of 64 blocks

# %% [markdown]
# ## 3. The block-sparse kernel
#
# `block_sparse_attention(q, k, v, layout, block_size)` gathers, for every query block, its kept key and
# value blocks into one tensor, does one batched matmul, **one** softmax over all kept keys and one matmul
# with the values. The backward is written out (FlashAttention's identity $dS = P\circ(dP-\mathrm{rowsum}(dO\circ O))$),
# so masked entries need no mask of their own. Two details make it fast: BigBird's *global* query blocks
# attend everything, so they go through a dense path instead of padding every row to their length,
# and masks are applied only where they change something (padding slots, the diagonal tile under causality).
#
# First, correctness: float64, 3 heads, batch 2, a length that is not a multiple of the block, outputs
# and gradients against dense attention with the equivalent boolean mask.

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
pat = sa.bigbird(200, block_size=16, n_random_blocks=2, n_heads=3, causal=True)
q, k, v = (torch.randn(2, 3, 200, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
mask = pat.dense_mask(3) & torch.ones(200, 200, dtype=torch.bool).tril()
out = sa.block_sparse_attention(q, k, v, pat.layout, 16, causal=True)
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
grads = torch.autograd.grad(out.square().sum(), (q, k, v))
ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
err = max([(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(grads, ref_grads)])
print("outputs and gradients match dense attention:", err < 1e-10)
assert err < 1e-10

# %% [markdown]
# ## 4. Time and memory as the sequence grows
#
# Now the real question: at what length does skipping scores pay? Batch 1, 4 heads, head dim 64, fp32,
# BigBird's defaults, forward+backward, best of 2 runs. Dense is PyTorch's fused
# `scaled_dot_product_attention` with the equivalent boolean mask. Memory is the peak of tensors alive
# during the call, counted by a `TorchDispatchMode` (tracemalloc cannot see tensor storage).
# Dotted lines are the FLOP counts, scaled to pass through the longest measured point.
# One CPU detail matters as much as the kernel: PyTorch has no caching allocator on CPU, so by default
# each tensor over 32 MiB is a fresh `mmap` whose pages fault in on first touch. `keep_freed_memory()`
# (run in the first cell) asks glibc to keep freed memory; it applies to every kernel alike, and
# `benchmarks/sparse_attention.py` records whether it was on. The memory panel's theory lines count the
# forward pass; the measured peak also holds backward's dP and dS tiles (each as large as the kept
# probabilities), so the block-sparse curve sits about twice above its forward line and parallel to it.
# Compiled FlexAttention has no backward on CPU, so its point is forward-only, on the right-hand panel.

# %%
# NBVAL_IGNORE_OUTPUT
make = lambda T: sa.bigbird(T, block_size=64, n_heads=4)
lens = [T for T in prof.seq_lens if T >= 512] + [2 * prof.seq_lens[-1]]
rows = lesson.sweep(make, lens, dense_up_to=min(lens[-1], 8192), repeats=2, device=prof.device, progress=True)
flex = {}
try:  # compiled FlexAttention, forward only on CPU (the first call compiles, which takes a while)
    kern = lesson.Kernels.make(make(lens[-2]), device=prof.device)
    flex[lens[-2]] = measure.time_it(kern.flex_fwd, repeats=2, device=prof.device)
except Exception as e:
    print("FlexAttention not available here:", type(e).__name__)
fig = lesson.plot_scaling(rows, make, flex=flex)
for r in rows:
    dense_txt = (f"dense {r['dense_s']:.3f} s, {r['dense_peak_bytes'] / 2**20:.0f} MiB ({r['dense_s'] / r['sparse_s']:.1f}x)"
                 if "dense_s" in r else "dense not run")
    print(f"T={r['seq_len']:6d}  block-sparse {r['sparse_s']:.3f} s, {r['sparse_peak_bytes'] / 2**20:.0f} MiB;  {dense_txt}")
print("block-sparse wins from", lesson.crossover(rows), "tokens;", "compiled flex forward:", flex)

# %%
# NBVAL_IGNORE_OUTPUT
sm = lesson.scaling_summary(rows, make)
faster = lambda x: f"{x:.1f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"
Markdown(f"Read the plot from the right. Dense time and memory grow as $T^2$ and follow the FLOP line; block-sparse "
         f"memory grows as $T$. At {sm['last_T']:,} tokens block-sparse is {faster(sm['last_speedup'])} than dense "
         f"and needs {sm['last_memory_ratio']:.1f}x less memory. At the short end, {sm['first_T']:,} tokens, "
         f"BigBird keeps {sm['first_tiles']:.0%} of the tiles, so the two kernels do nearly the same work: there "
         f"block-sparse is {faster(sm['first_speedup'])}, and on this machine it wins from "
         f"{sm['crossover']:,} tokens on (`lesson.crossover`). Fixed per-call costs (thread wake-ups, gathers, "
         f"Python) weigh most at short lengths and on a shared CPU. That crossover, not the asymptote, decides "
         f"whether a model should use sparse attention at its context length. `benchmarks/sparse_attention.py` "
         f"measures the same kernels up to 16,384 tokens, against compiled FlexAttention too, for your machine.")

# %%
# NBVAL_CHECK_OUTPUT
mem_growth = rows[-1]["sparse_peak_bytes"] / rows[-2]["sparse_peak_bytes"]
print("block-sparse peak memory grows less than 2.3x for 2x tokens:", mem_growth < 2.3)
assert mem_growth < 2.3  # linear, not quadratic
long, longer = [r for r in rows if "dense_s" in r][-2:]
assert longer["dense_peak_bytes"] / long["dense_peak_bytes"] > 3  # dense: quadratic
assert longer["sparse_s"] < longer["dense_s"]

# %% [markdown]
# ## 5. A tiny GPT, dense vs GPT-3's alternating dense / banded attention
#
# The course's shared transformer knows nothing about sparsity: `set_attention` swaps each layer's
# attention core from the outside. Here the even layers stay dense (causal) and the odd layers see only
# a band of recent tokens (`sa.alternating_dense_banded`). GPT-3 §2.1 names this pattern but gives
# neither the band width nor which layers are banded; the band of 16 tokens and the even/odd split are
# this lesson's choices. Same data, same seed, same steps.

# %%
# NBVAL_IGNORE_OUTPUT
from course.data import load_dataset
from course.model import ModelConfig, Transformer
from course.train import TrainConfig, train
from course.viz import attention_grid, plot_losses

data = load_dataset("char", "pydoc")
cfg = ModelConfig.from_profile(prof, data.tokenizer.vocab_size)
T, bs, W = cfg.block_size, 16, 16  # W: the band of the banded layers (this lesson's choice)
patterns = sa.alternating_dense_banded(cfg.n_layer, T, window=W, block_size=bs)
tcfg = TrainConfig(max_steps=prof.max_steps // 5, batch_size=prof.batch_size // 2, block_size=T,
                   eval_interval=20, eval_iters=5)
runs = {}
for name in ("dense", "alternating dense / banded"):
    g = torch.Generator().manual_seed(0)
    batch = lambda split: data.batch(split, tcfg.batch_size, T, generator=g, device=prof.device)
    torch.manual_seed(0)
    model = Transformer(cfg) if name == "dense" else lesson.sparse_gpt(cfg, lambda i: patterns[i])
    runs[name] = train(model.to(prof.device), batch, tcfg, label=name)
    print(runs[name])
ax = plot_losses(runs, title="same steps, same data: dense vs GPT-3-style sparse layers")

# %%
# NBVAL_CHECK_OUTPUT
gap = runs["alternating dense / banded"].final_val_loss - runs["dense"].final_val_loss
print("both learned:", all(h.val_loss[-1] < h.val_loss[0] - 0.5 for h in runs.values()))
print("sparse within 0.25 nats of dense:", abs(gap) < 0.25)
assert all(h.val_loss[-1] < h.val_loss[0] - 0.5 for h in runs.values())
assert abs(gap) < 0.25

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"After {tcfg.max_steps} steps with a context of {T} characters both models have learned, and the banded "
         f"one ends {gap:+.2f} nats from the dense one. So short a run says only that banding odd layers does "
         f"not break training here, not how the two would compare fully trained: most of what a character "
         f"model needs is nearby, and the dense layers in between can carry the rest. (At {T} tokens the "
         f"sparse model is not faster either: section 4 measured the crossover at {sm['crossover']:,} tokens.)")

# %% [markdown]
# ## 6. What the sparse model attends to
#
# The weights of each layer, computed under that layer's own pattern, on one validation window
# (rows: layers; columns: heads), on one colour scale: the banded (odd) layers are zero outside their
# band of recent tokens, while the dense layers may look anywhere to the left.

# %%
# NBVAL_IGNORE_OUTPUT
x, _ = data.batch("val", 1, T, generator=torch.Generator().manual_seed(1), device=prof.device)
maps = sa.sparse_attention_maps(model, x)[:, 0].cpu()  # (L, H, T, T)
n_show = 32
tokens = [data.tokenizer.decode([i]) for i in x[0, :n_show].tolist()]
odd = list(range(1, cfg.n_layer, 2))
fig = attention_grid(maps[:, :, :n_show, :n_show], tokens=tokens,
                     title=f"sparse model, first {n_show} positions: banded layers {odd}, the others dense")
dist = lesson.attention_distance(maps.unsqueeze(1))
print("mean attention distance (tokens) per layer:", [round(d, 1) for d in dist.mean(-1).tolist()])

# %%
# NBVAL_CHECK_OUTPUT
band = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-(W + 1))
outside = maps[1::2].masked_fill(band, 0).abs().max().item()
print("banded layers put no weight outside the band:", outside == 0)
assert outside == 0 and dist[1::2].max() <= W

# %% [markdown]
# ## Takeaways
#
# * A pattern is a choice of tiles: BigBird keeps ~8 blocks per row, so its cost is linear in $T$; GPT-3
#   kept every other layer dense and banded the rest.
# * Sparse only pays past a crossover length (printed in section 4); below it the pattern keeps almost
#   every tile and a fused dense kernel is as good.
# * Memory is where sparsity is most dependable: linear instead of quadratic, measured above.
# * `benchmarks/sparse_attention.py` measures the same at 8,192 and 16,384 tokens, and against compiled
#   FlexAttention's forward with the same `BlockMask`.
