# %% [markdown]
# # 04 · Activation checkpointing: what backward keeps, and trading compute for memory
#
# Training memory has four parts: **weights**, **gradients**, **optimizer state** (AdamW's m and v)
# and **activations**, the tensors the forward pass keeps because backward needs them. The first
# three grow with the parameter count; activations grow with batch × sequence length × depth (and,
# when attention is written out, with sequence length squared). At GPT-3 scale the model state is the
# larger part (section 4 computes both), but it can be sharded across GPUs (lesson 05's ZeRO, chapters
# 06–07); what each GPU must still hold for its own micro-batch is activations, and they grow with
# every token of context.
#
# **Activation checkpointing** (recomputation) keeps only a few tensors and recomputes the rest
# during backward: memory for time. In this lesson you will
# 1. measure, tensor by tensor, what autograd saves for one training step, and match it to the byte to
#    a per-op formula for this block, which in 16-bit reduces to Korthikanti et al. (2022)'s 34·sbh + 5·as²b;
# 2. apply six recomputation policies to the *unchanged* model and measure memory and time for each,
#    including the two kinds of selective recomputation (Korthikanti's attention core, and every cheap op);
# 3. watch activation memory grow with sequence length and batch, and see what fused attention removes;
# 4. scale the formula to GPT-3 175B and check it against the published numbers;
# 5. plan a run with a small widget.
#
# The library: `course/measure.py` (measurement), `course/costs.py` (formulas), `course/recompute.py`
# (policies and the planner), `course/lessons/recompute.py` (this lesson's experiments and figures).

# %%
import math

import matplotlib.pyplot as plt
import torch

from IPython.display import Markdown

from course.costs import (core_attention_layer_bytes, head_activation_bytes, korthikanti_flops, korthikanti_layer_bytes,
                          layer_activation_bytes, selective_layer_bytes)
from course.data import load_dataset
from course.device import profile
from course.lessons import recompute as lr
from course.measure import measure_step, saved_tensors
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention
from course.recompute import plan

prof = profile()
print(prof)
data = load_dataset("char")
g = torch.Generator().manual_seed(0)
batch = data.batch("train", prof.batch_size, prof.block_size, generator=g, device=prof.device)  # (x, y)
cfg = ModelConfig.gpt(n_layer=prof.n_layer, n_head=prof.n_head, n_embd=prof.n_embd, block_size=prof.block_size,
                      vocab_size=data.tokenizer.vocab_size)
B, T, C, H, L = prof.batch_size, prof.block_size, prof.n_embd, prof.n_head, prof.n_layer


def make_model(n_layer=L, **kw):
    torch.manual_seed(0)
    return Transformer(cfg.replace(n_layer=n_layer, **kw)).to(prof.device)

# %% [markdown]
# ## 1. What does backward keep?
#
# Every op that needs its inputs (or outputs) for the gradient *saves* them on the autograd graph:
# a linear layer keeps its input (to compute the weight gradient), GELU keeps its input, LayerNorm
# keeps its input plus the mean and 1/std it computed. `saved_tensors` hooks into exactly that
# (`torch.autograd.graph.saved_tensors_hooks`), counts each storage once (q, k and v are three views
# of one `c_attn` output) and labels each tensor with the module that saved it and the op that holds it.

# %%
model = make_model()
report, loss = saved_tensors(model, lambda: model(*batch)[1])
print(report)
per_block = report.under("blocks.0")
for name, nbytes in report.by_module().items():
    if name.startswith("blocks.0."):
        print(f"  {name:22s} {nbytes / 2**20:6.2f} MiB")

# %% [markdown]
# The formula, term by term for this block (pre-LN GPT-2, fused attention, fp32, no dropout):
# LayerNorm inputs 2·sbh, `c_attn` input sbh, q/k/v 3·sbh, attention output sbh (which `c_proj`
# reads without a copy), `c_fc` input sbh, GELU input 4·sbh, MLP `c_proj` input 4·sbh, i.e. **16·sbh
# elements** plus the LayerNorm statistics and the attention log-sum-exp. In 16-bit that is 32·sbh bytes;
# Korthikanti et al. (2022, §4.1) count **34·sbh + 5·a·s²·b** for a block with written-out attention and
# dropout: the two extra sbh are 1-byte dropout masks, the 5as²b are the s×s softmax output (2as²b), its
# dropout mask (as²b) and the dropped probabilities (2as²b), which fused attention never stores. The
# module docstring of `course/costs.py` lists every term and where this block differs from the paper.
# The per-block numbers match to the byte; the whole model's total differs by the few bytes that
# cross-entropy keeps outside the blocks, which the check below bounds (2% is far above them and far
# below one missing tensor of the block).

# %%
# NBVAL_CHECK_OUTPUT
analytic = layer_activation_bytes(T, B, C, H)
whole = L * sum(analytic.values()) + head_activation_bytes(T, B, C, cfg.vocab_size)
print(f"one block: measured {per_block:,} B, analytic {sum(analytic.values()):,} B")
print(f"whole model: measured {report.total:,} B, analytic {whole:,} B")
assert abs(per_block - sum(analytic.values())) <= 0.02 * per_block
assert abs(report.total - whole) <= 0.02 * whole

# %% [markdown]
# ### Where the memory of one training step goes
#
# `measure_step` runs forward, backward and an AdamW step under `LiveTensors`, a `TorchDispatchMode`
# that sees every tensor an op creates and follows its storage until it is freed (tracemalloc cannot see
# tensor memory). At the peak of the step (the end of forward, when every activation is alive) it splits
# the live bytes into weights, gradients, optimizer state and the rest. We split "the rest" by op with the
# saved-tensor report above (each label names the backward op that holds the tensor: `addmm` is a
# linear layer with bias, `native_layer_norm` a LayerNorm, ...), and add the logits the forward pass returns.

# %%
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model(*batch)[1].backward(); opt.step()  # first step creates AdamW's m and v
step = measure_step(model, batch, opt)
print(step)
fig = lr.plot_peak_breakdown(step, report, f"{L} layers x {C} wide, batch {B} x {T} tokens, fp32 AdamW")
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"Even this small model spends most of its peak on activations: the weights, gradients and AdamW state "
         f"together are 16 bytes per parameter, while the activations scale with the {B * T:,} tokens in the "
         f"batch. At the peak (the start of backward) only the first gradients exist, "
         f"{step.at_peak['gradients'] / 2**20:.2f} MiB: backward creates them as it frees activations.")

# %%
assert step.at_peak["activations & temporaries"] > step.at_peak["weights"] + step.at_peak["optimizer state"]
assert step.at_peak["optimizer state"] >= 8 * sum(p.numel() for p in model.parameters())

# %% [markdown]
# ## 2. Recomputation policies: memory against time
#
# `apply_policy(model, name)` changes *how the blocks are run*, not the model: `model.runner`, the
# model's one seam for running its blocks, becomes a `SegmentRunner` that runs the same Block objects
# (same parameter names, same state_dict) in segments through
# `torch.utils.checkpoint(..., use_reentrant=False)`; `model.blocks` is untouched, so sharding applied
# afterwards (lesson 05) still finds every block. The two selective
# policies share one op policy for `create_selective_checkpoint_contexts` (keep the outputs of `mm`,
# `addmm` and the fused attention ops, recompute the rest) and differ in where it applies: the whole
# block, or only `block.attn.core`.
#
# | policy | keeps | recomputes |
# |---|---|---|
# | none | everything | nothing |
# | full | each block's input | every block's forward (≈ +1 forward per step) |
# | every-k | inputs of every k-th block + the rest | 1/k of the forwards |
# | sqrt | the input of each of ⌈√n⌉-block segments (Chen et al. 2016) | every forward, segment by segment |
# | selective | outputs of the linears' matmuls and the fused attention kernel | LayerNorm, GELU, softmax, dropout, adds (op-level SAC) |
# | core-attention | everything outside the attention core | the core: QKᵀ, softmax, dropout, AV (Korthikanti et al. 2022) |
#
# A forward is about a third of a training step (backward costs two forwards), so full recomputation
# should cost ≈ 4/3 of the step time (the hollow markers: `course.recompute.plan`). We measure on a model twice as deep as the profile's, so √n
# segments differ from full recomputation. Timing rounds are interleaved and the fastest kept, on one
# CPU thread (two threads wait for each other whenever another program takes a core). The last policy,
# `none#control`, is an identical copy of `none`: its ratio, ideally 1.00, shows how far apart two
# measurements of the same work land on this machine. The memory numbers are exact.

# %%
deep = 2 * L
results = lr.measure_policies(lambda: make_model(deep), batch, ("none", "full", "every-k:2", "sqrt", "selective",
                                                              "none#control"),
                           rounds=5, progress=True, threads=1 if prof.device.type == "cpu" else None)
for r in results:
    print(f"{r.policy:12s} kept {r.activations / 2**20:6.1f} MiB   peak {r.peak / 2**20:6.1f} MiB   "
          f"step x{r.time_ratio:.2f}")

# %%
layer_bytes = sum(layer_activation_bytes(T, B, C, H).values())
fixed = results[0].step.at_peak["weights"] + head_activation_bytes(T, B, C, cfg.vocab_size)
fixed += B * T * cfg.vocab_size * 4  # the logits
kind = "cuda" if prof.device.type == "cuda" else "cpu"
plan_of = lambda spec: plan(deep, C, H, T, B, *lr.parse_policy(spec), bytes_per_el=4, device=kind)
fig = lr.plot_policies(results, plan_of, fixed, f"{deep} layers, batch {B} x {T}: filled = measured, hollow = analytic (plan)")
plt.show()

# %% [markdown]
# Full recomputation keeps one block input per layer and pays about one extra forward. √n segments keep
# even less between segments but, during backward, hold one whole segment's activations (⌈√n⌉ layers):
# Chen et al.'s bound is about 2√n layer-units. The memory numbers are exact and repeatable; the times
# are not: on a quiet machine full recomputation costs about one extra forward, while
# on a shared machine every policy with recomputation also pays for waiting on busy cores (the
# `none#control` point shows how far two runs of identical work land apart). Small tensors
# also make per-op overheads visible: checkpoint's hooks, and the selective policy's bookkeeping (it
# decides for every op whether to cache its output), which vanish next to large GPU kernels.
# With fused attention there is no s×s matrix left to drop, so the selective policy can only drop what
# the cheap ops produced (LayerNorm and GELU outputs: the assert above checks the exact bytes against
# `course.costs.selective_layer_bytes`), and core-attention saves nothing: the fused kernel's output
# is kept and nothing is recomputed. The next section writes attention out, as the paper did.

# %%
res = {r.policy: r for r in results}
assert res["full"].activations < res["every-k:2"].activations < res["none"].activations
assert res["sqrt"].peak_activations <= 2 * math.sqrt(deep) * layer_bytes  # Chen et al.: ~2 sqrt(n) layers
assert res["selective"].activations < res["none"].activations
expected_sel = deep * (layer_bytes - selective_layer_bytes(T, B, C, H))
assert abs((res["none"].activations - res["selective"].activations) - expected_sel) <= 0.02 * expected_sel

# %% [markdown]
# ### Two kinds of selective recomputation, with attention written out
#
# Korthikanti et al. (2022, §5) observed that in a transformer layer the largest activations are also the
# cheapest to rebuild. These are the attention core's s×s tensors: the softmax output, its dropout mask
# and the dropout output (the scores QKᵀ themselves are not stored: Q and K are). In 16-bit they are 5·a·s/h of the 34 + 5·a·s/h bytes per s·b·h,
# and rebuilding them costs two attention matmuls and a few pointwise ops. The paper's *selective
# recomputation* checkpoints only that core; Megatron-LM calls it `--recompute-granularity selective`.
# Here that is the policy `core-attention`.
#
# The op-level `selective` policy goes further, as torchtitan's op SAC does. Across the whole block it
# keeps only the outputs of the linear layers' matmuls and recomputes every other op.
#
# Both help only when the s×s matrices exist, so we measure them in the paper's setting: attention
# written out (`MatmulAttention`) and dropout 0.1. The first line shows which share of a layer's
# activations the s×s terms are at this shape, by the paper's 16-bit formula.

# %%
def make_written_out(n_layer=deep):
    m = make_model(n_layer, dropout=0.1)
    set_attention(m, lambda i: MatmulAttention())
    return m


share = 1 - korthikanti_layer_bytes(T, B, C, H, "selective") / korthikanti_layer_bytes(T, B, C, H, "none")
print(f"s x s terms at s={T}, h={C}, a={H}: {share:.0%} of a layer's 16-bit activations (5as/h = {5 * H * T / C:.0f} of "
      f"{34 + 5 * H * T / C:.0f} bytes per sbh)")
written = lr.measure_policies(make_written_out, batch, ("none", "selective", "core-attention", "none#control"), rounds=5, progress=True,
                           threads=1 if prof.device.type == "cpu" else None)
for r in written:
    print(f"{r.policy:14s} kept {r.activations / 2**20:6.1f} MiB ({1 - r.memory_ratio:4.0%} saved)   "
          f"peak {r.peak / 2**20:6.1f} MiB   step x{r.time_ratio:.2f}")

# %%
w = {r.policy: r for r in written}
layer_w = sum(layer_activation_bytes(T, B, C, H, core="matmul", dropout=True, device=kind).values())
dropped = deep * (layer_w - core_attention_layer_bytes(T, B, C, H, core="matmul", dropout=True, device=kind))
assert abs((w["none"].activations - w["core-attention"].activations) - dropped) <= 0.02 * dropped  # exactly the s*s terms
assert w["selective"].activations < w["core-attention"].activations < w["none"].activations

costs = lr.core_recompute_costs(B, H, T, C // H, device=prof.device)
fig = lr.plot_written_out(written, costs, prof.device.type, title=f"written-out attention, dropout 0.1, {deep} layers")
plt.show()

# %% [markdown]
# `core-attention` drops exactly the s×s terms, as the assert checks against the formula. That is why the
# paper gets about 70% at GPT-3's shape (s/h = 1/6, 96 heads) but much less here, where s = h and there
# are only 4 heads. `selective` also drops the LayerNorm and GELU outputs and the residual-dropout masks,
# so it saves more memory and recomputes more ops.
#
# The shaded box is the course's target for selective recomputation (at least 40% of activations
# dropped for at most 10% more step time: roughly what Korthikanti et al. report at GPT-3 scale, 70% for
# 2.7% more FLOPs); the grey band is the timing noise, from 1 to the identical-model control's ratio.
# The time side depends on the hardware. The right-hand chart times the ops that recomputing one core
# repeats. On this CPU the **dropout mask** dominates: `bernoulli_` draws its random numbers one element at a
# time, so regenerating the mask costs several softmaxes. Recomputation therefore costs more here than
# the paper's few percent. On a GPU the mask comes from a counter-based generator (Philox) inside the
# dropout kernel, as cheap as any other pointwise op. `benchmarks/checkpointing.py` measures both policies
# at this shape and at GPT-3's ratios, on CPU and (with `--gpu`) on a GPU. Where a GPU run has been
# recorded, it is printed below.

# %%
from course.reference import describe, gpu_reference

print(describe("checkpointing"))
ref = gpu_reference("checkpointing")
if ref is not None:
    for name, t in ref["targets"].items():
        print(f"  {name:38s} measured {t['measured']}   target {t['target']}   met: {t['met']}")

# %% [markdown]
# ### Memory through one step
#
# The tracker also records the live bytes after every op. Without recomputation memory climbs through the
# forward pass and falls as backward frees what it used; with full recomputation it stays low and each
# block's activations briefly reappear while that block is recomputed.

# %%
fig, ax = plt.subplots(figsize=(9, 3.5))
for policy in ("none", "sqrt", "full"):
    st = res[policy].step
    ax.plot([v / 2**20 for v in st.timeline], label=f"{policy} (peak {st.peak / 2**20:.0f} MiB)")
ax.set_xlabel("op index through forward + backward"); ax.set_ylabel("live MiB")
ax.set_title("live tensor memory during one training step (weights included)"); ax.legend(); plt.show()

# %% [markdown]
# ## 3. Activation memory against sequence length and batch
#
# Per layer, activations grow like `s·b·h·(16 elements)` with fused attention, and like
# `s·b·h·16 + a·s²·b` (plus dropout terms) when attention is written out (the s×s softmax is kept).
# We measure one block's saved bytes for both attention cores (forward only, so it is quick) and draw the
# analytic curves through them.

# %%
seqs = [s for s in prof.seq_lens if s <= 2048]
batches = [1, 2, 4, 8, 16]
curves = lr.layer_curves(C, H, seqs, batches, device=prof.device)
fig = lr.plot_layer_curves(curves, C, H, seqs, batches)
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
s_max = seqs[-1]
soft = H * s_max * s_max * 4
Markdown(f"Batch is linear for both. Sequence length is linear with fused attention and turns quadratic without it: "
         f"at s = {s_max:,} the written-out core keeps the {H} heads × {s_max:,} × {s_max:,} softmax in fp32 "
         f"({soft / 2**20:.0f} MiB) next to {(curves['matmul'][0][-1] - soft) / 2**20:.0f} MiB of everything else. "
         f"That quadratic term is what Korthikanti's 5·a·s²·b counts and what FlashAttention-style kernels (here "
         f"`aten._scaled_dot_product_flash_attention_for_cpu`) remove: they never *store* the scores, and their "
         f"backward recomputes them from q, k, v and the per-row log-sum-exp (Dao et al. 2022, §3.1; lesson 11 "
         f"builds such a kernel).")

# %%
for core, (by_s, by_b) in curves.items():
    for s, got in zip(seqs, by_s):
        want = sum(layer_activation_bytes(s, 1, C, H, core=core).values())
        assert abs(got - want) <= 0.02 * want, (core, s)
assert curves["matmul"][0][-1] / curves["matmul"][0][-2] > 2.5  # superlinear in s
assert abs(curves["sdpa"][0][-1] / curves["sdpa"][0][-2] - 2) < 0.05  # linear in s

# %% [markdown]
# ## 4. GPT-3 175B with the formula
#
# GPT-3 175B: 96 layers, h = 12,288, 96 heads, s = 2,048, vocabulary 51,200 (Megatron's padding of 50,257).
# Per layer and per sequence (b = 1), in 16-bit with attention written out (Korthikanti et al.'s setting),
# no tensor parallelism. The paper reports that selective recomputation saves about **70%** of activation
# memory for **2.7%** extra FLOPs on GPT-3 (1.6% on MT-NLG 530B).

# %%
# NBVAL_CHECK_OUTPUT
s, b, h, a, nl, V = 2048, 1, 12288, 96, 96, 51200
paper = {p: korthikanti_layer_bytes(s, b, h, a, p) for p in ("none", "selective", "full")}
ours = {"none": sum(layer_activation_bytes(s, b, h, a, bytes_per_el=2, core="matmul", dropout=True,
                                           device="cuda").values()),
        "fused": sum(layer_activation_bytes(s, b, h, a, bytes_per_el=2, dropout=True, device="cuda").values())}
for name, v in {**{f"paper {k}": v for k, v in paper.items()}, **{f"our block {k}": v for k, v in ours.items()}}.items():
    print(f"{name:22s} {v / 2**30:6.2f} GiB per layer, {nl * v / 2**30:7.1f} GiB for 96 layers")
saving = 1 - paper["selective"] / paper["none"]
overhead = korthikanti_flops(s, b, h, nl, V, "selective") / korthikanti_flops(s, b, h, nl, V) - 1
print(f"selective recompute saves {saving:.1%} of activation memory for {overhead:.2%} more FLOPs")
assert abs(saving - 0.70) < 0.01 and abs(overhead - 0.027) < 0.001

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
bars = {"no recompute": paper["none"], "selective": paper["selective"], "fused attention (ours)": ours["fused"],
        "full": paper["full"]}
ax.barh(list(bars), [nl * v / 2**30 for v in bars.values()])
ax.set_xlabel("activation GiB per 2,048-token sequence, 96 layers, 16-bit")
ax.set_title("GPT-3 175B, Korthikanti et al. formula (no tensor parallelism)"); plt.tight_layout(); plt.show()

# %%
# NBVAL_CHECK_OUTPUT
Markdown(f"About {nl * paper['none'] / 2**30:.0f} GiB of activations per sequence without recomputation: no single "
         f"GPU of 2020 holds one sequence. Megatron-LM's answer (Korthikanti et al. 2022, two years after GPT-3) "
         f"combines recomputation with tensor and sequence parallelism, dividing these numbers by the "
         f"tensor-parallel degree t; the GPT-3 paper itself does not say how it handled activations. Selective "
         f"recomputation keeps 34·sbh per layer ({nl * paper['selective'] / 2**30:.0f} GiB); fused attention "
         f"reaches about the same point ({nl * ours['fused'] / 2**30:.0f} GiB) without *storing* the s×s matrices — "
         f"its backward recomputes them tile by tile, which is cheap because it never leaves the kernel.")

# %% [markdown]
#
# On FLOPs: the paper's hardware-FLOPs formula counts selective recomputation as 72·b·s·l·h²·(1 + s/3h + V/12hl)
# against 72·b·s·l·h²·(1 + s/6h + V/12hl) without it, which gives 2.7%. Counting only one extra forward of
# QKᵀ and AV (4·b·s²·h per layer) gives ≈ 0.9%: the published figure is the conservative one.

# %% [markdown]
# ## 5. A planner
#
# `course.recompute.plan` puts the pieces together for a GPT of any shape: weights/gradients/AdamW state at
# 16 bytes per parameter (mixed precision), activations kept and at the backward peak for a policy, and
# the extra compute. Its "core-attention" is the paper's selective recomputation and keeps exactly the
# paper's 34·sbh per layer (plus the LayerNorm statistics); its "selective" is this course's op-level policy,
# which also recomputes LayerNorm, GELU and dropout and keeps 10·sbh elements with written-out attention. The widget below calls it (its last state is printed under it, so the page shows a result without a
# running kernel); the function itself is tested in `tests/test_memory.py`.

# %%
# NBVAL_CHECK_OUTPUT
for policy in ("none", "core-attention", "selective", "sqrt", "full"):
    p = plan(96, 12288, 96, 2048, 1, policy, dropout=True, core="matmul")
    print(f"GPT-3, 1 sequence, {policy:9s}: states {p['weights'] + p['gradients'] + p['optimizer state']:6.0f} GiB, "
          f"activation peak {p['activations peak']:6.1f} GiB, extra compute {p['extra compute']:.1%}")
core = plan(96, 12288, 96, 2048, 1, "core-attention", dropout=True, core="matmul")["activations kept"] * 2**30
assert core == 96 * (korthikanti_layer_bytes(2048, 1, 12288, 96, "selective") + 2 * 2 * 2048 * 4)  # + LayerNorm stats

# %%
lr.planner()

# %%
# NBVAL_CHECK_OUTPUT
print("the planner at its default settings:", lr.plan_line(), sep="\n")

# %% [markdown]
# ## What to remember
#
# - Backward keeps about 16 elements per token per hidden unit per layer in this block (34 bytes in
#   16-bit with dropout, Korthikanti et al.), plus 5·a·s² per token when attention is written out.
#   The measurement and the per-op formula agree to the byte for every block.
# - Full recomputation keeps one tensor per layer for about one extra forward (≈ 4/3 step time);
#   √n segments keep ~2√n layers for the same compute; selective recomputation keeps the expensive
#   outputs and recomputes the cheap ones.
# - Korthikanti's selective recomputation (`core-attention`) drops exactly the s×s terms. How much memory
#   that saves depends on 5as/h: 70% at GPT-3's shape, far less for a small model. What it costs depends
#   on the hardware: dropout masks are cheap to regenerate on a GPU and expensive on this CPU.
# - Fused attention removes the stored s² term (its backward recomputes the tiles inside the kernel);
#   what is left scales with s·b·h·L.
# - Checkpointing changes how blocks run, not the model: the same weights load, the gradients are
#   bitwise identical (dropout included, because checkpoint restores the RNG state).
