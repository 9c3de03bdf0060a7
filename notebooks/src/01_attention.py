# %% [markdown]
# # 01 · Self-attention: from scratch, its O(n²) bill, and what trained heads do
#
# Every model in this course — GPT, BERT, ViT, SAM — mixes information between positions with one
# operation, scaled dot-product attention (Vaswani et al. 2017, eq. 1):
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}} + M\right) V$$
#
# Each position emits a query $q_i$, a key $k_j$ and a value $v_j$ (three linear maps of its features).
# Query $i$ scores every key by a dot product, the softmax turns a row of scores into weights that sum to
# 1, and the output is the weighted average of the values. $M$ is the mask: $0$ where query $i$ may look
# at key $j$, $-\infty$ where it may not. Dividing by $\sqrt{d_k}$ keeps the scores' variance near 1 so
# the softmax does not saturate. Heads run this in parallel on slices of width $d_k = C / n_{head}$.
#
# This lesson writes it out, checks it against PyTorch's fused kernel, draws the two masks that separate
# GPT from BERT, measures why the $T \times T$ score matrix makes long contexts expensive, and looks
# inside a small model trained here.

# %%
# NBVAL_IGNORE_OUTPUT
import inspect
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from IPython.display import Markdown

from course.attention import ScratchAttention, bidirectional_mask, causal_mask, self_attention
from course.costs import GPT3_175B, korthikanti_layer_bytes, score_matrix_bytes
from course.lessons.attention import (attention_explorer, describe_heads, explore_attention, head_stats, loglog_slope,
                                      plot_cost_scaling,
                                      score_matrix_cost)
from course.data import load_dataset
from course.device import profile
from course.model import ModelConfig, Transformer, attention_maps, set_attention
from course.train import TrainConfig, train
from course.viz import attention_grid, plot_attention

prof = profile()
print(prof)

# %% [markdown]
# ## Attention from scratch
#
# The whole computation, as `course.attention_basics.self_attention` writes it (the softmax subtracts the
# row maximum before `exp`, which changes nothing mathematically but keeps `exp` from overflowing):

# %%
print(inspect.getsource(self_attention))

# %% [markdown]
# PyTorch's `F.scaled_dot_product_attention` computes the same thing with a fused kernel that never
# shows us the weights. Same random q, k, v at the profile's head sizes, in float64 because the claim is
# mathematical equality: the outputs must agree to float64 rounding (`assert_close`'s float64 tolerance,
# about 1e-7 relative, is far above it), with and without the causal mask.

# %%
g = torch.Generator().manual_seed(0)
B, nh, T, hs = 2, prof.n_head, 64, prof.n_embd // prof.n_head
q, k, v = (torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64) for _ in range(3))  # (B, nh, T, hs)
for causal in (False, True):
    ours, weights = self_attention(q, k, v, causal=causal)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    err = (ours - fused).abs().max().item()
    print(f"causal={causal!s:5}: max |ours - SDPA| = {err:.1e}, rows of weights sum to 1: "
          f"{torch.allclose(weights.sum(-1), torch.ones(B, nh, T, dtype=torch.float64))}")
    torch.testing.assert_close(ours, fused)

# %% [markdown]
# The same function can replace the fused kernel inside the course's transformer (`set_attention` swaps the
# attention core of every layer). The logits of a whole model must not change:

# %%
# NBVAL_CHECK_OUTPUT
torch.manual_seed(0)
probe = Transformer(ModelConfig(vocab_size=100, block_size=32, n_layer=2, n_head=prof.n_head,
                                n_embd=prof.n_embd)).double().eval()  # float64: an equality claim
idx = torch.randint(0, 100, (2, 32), generator=g)
fused_logits, _ = probe(idx)
set_attention(probe, lambda i: ScratchAttention())
scratch_logits, _ = probe(idx)
torch.testing.assert_close(scratch_logits, fused_logits)  # float64 defaults: rtol 1e-7, atol 1e-7
print("from-scratch attention inside the model gives the same logits:", True)

# %% [markdown]
# ## Causal vs bidirectional: the mask is the whole difference between GPT and BERT
#
# A GPT predicts the next token, so position $i$ must not see positions after it: the causal mask keeps
# the lower triangle. BERT fills in blanks using both sides, so nothing is masked. Same weights, same code;
# only $M$ changes. Below: the two masks (blue = may attend), and the attention weights each produces on
# the same random q, k.

# %%
T_small = 12
qs, ks, vs = (torch.randn(1, 1, T_small, hs, generator=g) for _ in range(3))
fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
for ax, (name, mask) in zip(axes[:2], (("causal (GPT)", causal_mask(T_small)),
                                       ("bidirectional (BERT)", bidirectional_mask(T_small)))):
    ax.imshow(mask.numpy(), cmap="Blues", vmin=0, vmax=1.3)
    ax.set(title=f"{name} mask", xlabel="key position j", ylabel="query position i")
for ax, causal in zip(axes[2:], (True, False)):
    _, w = self_attention(qs, ks, vs, causal=causal)
    plot_attention(w[0, 0], ax=ax, title=f"weights, {'causal' if causal else 'bidirectional'}")
fig.tight_layout()
plt.show()

# %% [markdown]
# Consequence, and the property every GPT relies on when it generates one token at a time: changing a
# *future* token cannot change any *earlier* output under the causal mask, while under the bidirectional
# mask it changes all of them.

# %%
k2, v2 = ks.clone(), vs.clone()
k2[..., 8:, :] += 5.0  # perturb positions 8..11
v2[..., 8:, :] -= 5.0
for causal in (True, False):
    before, _ = self_attention(qs, ks, vs, causal=causal)
    after, _ = self_attention(qs, k2, v2, causal=causal)
    changed = (before - after).abs().amax(-1)[0, 0] > 1e-6  # (T,) which outputs moved
    print(f"causal={causal!s:5}: outputs changed at positions {changed.nonzero().flatten().tolist()}")
    assert changed[:8].any() != causal  # causal: no earlier output moved; bidirectional: they did

# %% [markdown]
# ## The O(n²) bill
#
# Per head, $QK^\top$ is a $T \times T$ matrix: doubling the context quadruples its size and the work to
# fill it, softmax it and multiply it by $V$ (the projections and the MLP only double). Here we time one
# from-scratch attention forward (median of 5; on a CPU with one thread, so thread start-up
# costs and other programs disturb it less) and count the bytes of its score matrix for
# growing $T$, at the profile's head count and width.

# %%
# NBVAL_IGNORE_OUTPUT
rows = score_matrix_cost(prof.seq_lens, n_head=prof.n_head, head_dim=hs, device=prof.device, repeats=5)
for r in rows:
    print(f"T = {r['T']:>6,}: {r['seconds'] * 1e3:9.2f} ms, score matrix {r['score_bytes'] / 2**20:9.1f} MiB")

# %%
fig, time_slope, byte_slope = plot_cost_scaling(rows, prof.n_head)
plt.show()

# %% [markdown]
# Memory is exactly quadratic (slope 2). Time bends toward slope 2 as $T$ grows: at short lengths fixed
# per-call costs dominate, and once the score matrix no longer fits in the CPU's caches, every pass over
# it (scale, mask, max, exp, sum, divide) streams from main memory, which can push the slope above 2.
#
# At GPT-3's size the bill is large (printed below with `course.costs`): one 16-bit copy of the 96 heads'
# 2048 × 2048 scores in each of 96 layers is about as large as everything else a layer keeps for
# backward (Korthikanti et al. 2022's 34·sbh bytes per layer), and the softmax output, its dropout mask
# and the dropped probabilities together, the 5·a·s²·b bytes a written-out layer stores, are more than
# twice that. That is why training kernels (FlashAttention, lesson 11) never store the matrix, why
# chapter 03 makes it sparse, and why chapter 04 recomputes instead of storing.

# %%
# NBVAL_CHECK_OUTPUT
assert abs(byte_slope - 2.0) < 1e-6, byte_slope
assert 1.4 < time_slope < 3.2, f"time should grow roughly as T^2, fitted slope {time_slope:.2f}"
g3 = GPT3_175B
scores = score_matrix_bytes(g3["seq_len"], g3["n_head"], n_layer=g3["n_layer"])  # one fp16 copy, one sequence
rest = g3["n_layer"] * korthikanti_layer_bytes(g3["seq_len"], 1, g3["n_embd"], g3["n_head"], "selective")  # 34·sbh
print(f"GPT-3, one 2048-token sequence: score matrices {scores / 1e9:.0f} GB if stored once; "
      f"everything else backward keeps (34·sbh per layer) {rest / 1e9:.0f} GB; the 5·a·s²·b of a "
      f"written-out layer {2.5 * scores / 1e9:.0f} GB")

# %% [markdown]
# ## What trained heads attend to
#
# Random q and k give near-uniform rows. A trained model's heads specialise. We train the tour's tiny
# character-level GPT again with the same recipe on half the tokens (half the tour's context; the run's
# time is printed with it), and look at its attention weights on a line of Python. `attention_maps` temporarily swaps every layer's core for the from-scratch
# one that keeps its weights: shape (layers, batch, heads, T, T).

# %%
# NBVAL_IGNORE_OUTPUT
data = load_dataset("char")
vocab = data.tokenizer.vocab_size
torch.manual_seed(0)
model = Transformer(ModelConfig.from_profile(prof, vocab, causal=True)).to(prof.device)
untrained = Transformer(ModelConfig.from_profile(prof, vocab, causal=True)).to(prof.device)
gen = torch.Generator().manual_seed(0)
context = prof.block_size // 2
batch_fn = lambda split: data.batch(split, prof.batch_size, context, generator=gen, device=prof.device)
cfg = TrainConfig(max_steps=prof.max_steps, batch_size=prof.batch_size, block_size=context,
                  lr=3e-3, warmup_steps=20, eval_interval=50, eval_iters=5,
                  autocast_dtype=prof.dtype if prof.device.type == "cuda" else None)
hist = train(model, batch_fn, cfg, label="tiny GPT")
hist

# %%
sentence = "def area(r): return 3.14 * r * r"
idx = torch.tensor([data.tokenizer.encode(sentence)], device=prof.device)
maps = attention_maps(model, idx)[:, 0]  # (L, H, T, T)
fig = attention_grid(maps, tokens=list(sentence), title="trained tiny GPT: every layer and head (rows: queries)")
plt.show()

# %% [markdown]
# Each small square is one head: row $i$ is where query position $i$ puts its weight over keys $j \le i$
# (the upper triangle is empty — causal). The patterns to look for, which become crisp in larger or
# longer-trained models (try the GPU profile):
# - a **diagonal just below the main one**: a *previous-token head* — copy what the last character was;
#   the building block of bigram statistics and, one layer later, of induction heads (Olsson et al. 2022);
# - the **main diagonal**: a head that mostly reads its own position;
# - a **bright first column**: a head parking weight on the first token when nothing else is useful
#   (the "attention sink" of large models);
# - **vertical stripes**: many queries attending the same key, wherever it is — heads that pick keys by
#   content (a space, a bracket, the start of a word); layer 1 above is full of them;
# - **broad, smeared rows**: heads averaging the recent context.
#
#
# How far this model got is printed next; the numbers per head follow (weights averaged over query
# positions; "x uniform" compares with a head that spreads its weight evenly over the visible keys).

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"After {hist.elapsed_s:.0f} s of training ({cfg.max_steps} steps) this model's heads are only beginning "
         f"to specialise: the positional preferences are leanings, not yet sharp diagonals.")

# %%
# NBVAL_IGNORE_OUTPUT
print("\n".join(describe_heads(maps)))

# %% [markdown]
# Before training, every head is close to uniform over the visible keys (scores start near zero), so its
# entropy is close to the maximum. Training lowers it: heads become selective.

# %%
stats = head_stats(maps)
stats0 = head_stats(attention_maps(untrained, idx)[:, 0])
uniform = head_stats(causal_mask(idx.size(1)).float().div(torch.arange(1, idx.size(1) + 1)[:, None])[None, None])
print(f"mean attention entropy (nats): uniform {uniform['entropy'].item():.2f}, "
      f"untrained {stats0['entropy'].mean():.2f}, trained {stats['entropy'].mean():.2f}")
print(f"mean look-back (characters): uniform {uniform['distance'].item():.1f}, "
      f"untrained {stats0['distance'].mean():.1f}, trained {stats['distance'].mean():.1f}")
print(f"most previous-token-like head: weight {stats['prev'].max():.2f} on the previous character "
      f"(uniform: {uniform['prev'].item():.2f})")

# %%
# NBVAL_CHECK_OUTPUT
U = {key: value.item() for key, value in uniform.items()}
assert abs(stats0["entropy"].mean() - U["entropy"]) < 0.05 * U["entropy"], "untrained heads should be ~uniform"
assert stats["entropy"].mean() < 0.85 * U["entropy"], "trained heads should be more selective"
assert stats["distance"].mean() < 0.9 * U["distance"], "trained heads should favour recent characters"
assert stats["prev"].max() > 1.5 * U["prev"], "some head should lean to the previous character"
print("trained heads are more selective and more local than uniform ones:", True)

# %% [markdown]
# ## Explore
#
# Pick a layer, a head and a sentence. The widget only calls `explore_attention(model, tokenizer, text,
# layer, head)` — a plain library function (tested in `tests/test_attention.py`) that you can also
# call directly, as in the cell after it. (Widgets need a live kernel; the static call below always works.)

# %%
# NBVAL_IGNORE_OUTPUT
sentences = ["def area(r): return 3.14 * r * r",
             "The for statement iterates over a list.",
             "if x > 0: print(x, end='')",
             "Strings are immutable sequences."]


attention_explorer(model, data.tokenizer, sentences, prof.n_layer, prof.n_head)

# %%
best = divmod(int(stats["prev"].argmax()), prof.n_head)  # (layer, head) of the most previous-token-like head
view = explore_attention(model, data.tokenizer, sentences[1], *best, ax=plt.subplots(figsize=(6, 5.5))[1])
plt.show()
print("query -> key it attends most:", ", ".join(f"{q!r}->{k!r}" for q, k, _ in view.strongest()[1:12]))

# %% [markdown]
# **Takeaways.** Attention is a dozen lines: scores, mask, softmax, weighted sum — and the mask alone
# decides GPT vs BERT (chapter 02). Its score matrix costs O(T²) time and memory per head, measured above;
# chapters 03 (sparse attention) and 04 (activation checkpointing) are two answers to that bill. Trained
# heads move away from uniform after a short run — more selective, more local — and with more training
# settle into distinct, readable jobs.
