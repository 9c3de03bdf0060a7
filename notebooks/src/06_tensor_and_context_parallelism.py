# %% [markdown]
# # 06 · Splitting inside a layer: tensor, sequence and context parallelism
#
# Data parallelism (lesson 05) gives every GPU a whole copy of the model. When one layer's weights,
# or one sequence's activations, no longer fit on a GPU, the layer itself has to be split:
#
# - **Tensor parallelism** (Megatron-LM, Shoeybi et al. 2019): a layer's matrix multiplies are cut by
#   columns and rows, attention by heads, the vocabulary by rows; two all-reduces per block and direction.
# - **Sequence parallelism** (Korthikanti et al. 2022, §4.2.2): each all-reduce becomes a reduce-scatter
#   and an all-gather of the same bytes (plus, in Megatron-LM's form, one all-gather again in backward),
#   and the LayerNorms and dropouts between the matrix multiplies run on 1/t of the tokens: every
#   activation is divided by t.
# - **Context parallelism**: the sequence itself is split; attention, the one part that mixes tokens,
#   runs as a ring (Liu et al. 2023) or by all-to-all (DeepSpeed-Ulysses, Jacobs et al. 2023).
#
# Everything runs for real on CPU processes talking through `torch.distributed` (gloo), is checked
# equal to the unsplit model in float64, and has every collective counted against its formula. At the
# end, the bandwidths of real links say why tensor parallelism stays inside one server.
#
# ```
# torchrun --standalone --nproc-per-node=2 -m course.parallel.tp_experiments   # the same checks, by torchrun
# torchrun --standalone --nproc-per-node=4 -m course.parallel.cp_experiments
# ```

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown, display

from course.costs import (layer_activation_bytes, ring_attention_saved_bytes, tensor_parallel_bytes,
                          tensor_parallel_layer_bytes)
from course.device import profile
from course.lessons import model_parallel as mp
from course.parallel import launch
from course.parallel.cp_experiments import attention_memory
from course.parallel.experiments import Setup

# gloo ranks run on the CPU: CPU sizes there, the GPU profile only when NCCL has a GPU per rank
prof = profile() if launch.backend(4) == "nccl" else profile("cpu")
setup = Setup(n_layer=2, n_head=4, n_embd=prof.n_embd // 2, vocab_size=64, block_size=prof.block_size // 2,
              batch_size=8, steps=3, dtype="float64")  # float64: the claims below are equalities
print(prof)
print(f"tensor-parallel model: {setup.n_layer} layers, width {setup.n_embd}, {setup.n_head} heads, "
      f"vocabulary {setup.vocab_size}; {setup.batch_size} sequences of {setup.block_size} tokens")

# %% [markdown]
# ## 1. Megatron's split: columns, rows and heads
#
# An MLP computes `GeLU(X A) B`. Split A by **columns**, A = [A₁ A₂]: each rank computes GeLU(X Aᵢ)
# on its own, because GeLU acts element by element. Split B by **rows** to match: rank i computes
# GeLU(X Aᵢ) Bᵢ, and the output is the **sum** over ranks: one all-reduce. Attention is split the same
# way by heads: rank i owns the q, k, v columns of heads i·a/t … (i+1)·a/t of `c_attn` and the matching
# rows of `c_proj`'s input; each rank runs *the layer's own attention core* on fewer heads.
#
# Two autograd functions, conjugate to each other, carry all the communication
# (Shoeybi et al. 2019, section 3):
#
# | | forward | backward |
# |---|---|---|
# | **f**, before a column-parallel linear | identity | all-reduce |
# | **g**, after a row-parallel linear | all-reduce | identity |
#
# `course.parallel.tensor.apply_tensor_parallel` replaces the model's linears with parallel ones that
# slice one full "master" weight, so both ranks start exactly where one process starts. Below, one
# launch of 2 ranks runs every check of sections 1–4; the picture is drawn from the ranks' real shards.

# %%
# NBVAL_IGNORE_OUTPUT
two = launch.run(mp.two_rank_run, 2, setup, timeout=600)
print(f"2 ranks: launch + all checks in {two.seconds:.0f} s")

# %%
fig = mp.plot_shards([r["shards"] for r in two.values], setup.n_head)

# %% [markdown]
# Each colour is the part one rank holds. `c_attn` (left) is split by output rows in three places at
# once, so that each rank gets *whole heads* of q, k and v (dotted lines: heads; solid: q | k | v);
# its partner `c_proj` is split by input columns. `c_fc` and the MLP's `c_proj` (4× wider) form the
# same pair. The vocabulary (token embedding, tied to the output layer) is split by rows.
#
# The split model must compute exactly what the whole model computes. The logits stay split by
# vocabulary (each rank holds V/t of them); the cross-entropy needs only, per token, the log-sum-exp
# over the whole vocabulary and the target's logit, so one all-gather of two numbers per token
# replaces gathering the logits (`course.parallel.vocab`).

# %%
# NBVAL_CHECK_OUTPUT
TOL = 1e-10  # float64 (eps 2.2e-16): the split only reorders sums of a few hundred terms; a bug is off by > 1e-3
for rank, r in enumerate(two.values):
    m = r["model"]
    assert abs(m["loss"] - m["reference_loss"]) < TOL and m["logits"] < TOL and m["grads"] < TOL, m
    for kind in ("tensor", "sequence"):
        for label, check in (("ours", r["block"][kind]), ("DTensor", r["dtensor"][kind])):
            assert max(check["output"], check["input_grad"], check["weight_grads"]) < TOL, (kind, label, check)
print(f"logits per rank {two.values[0]['model']['logits_shape']} (B, T, V/t); loss, logits and every gradient")
print("equal the unsplit model within 1e-10 in float64, on both ranks; so does one block under tensor and")
print("sequence parallelism, ours and PyTorch's own (parallelize_module with Colwise/Rowwise/SequenceParallel)")

# %% [markdown]
# PyTorch's own tensor parallelism (`torch.distributed.tensor.parallel`) expresses the same split as
# *placements* of DTensors on a DeviceMesh: `ColwiseParallel` shards a weight's rows (`Shard(0)`),
# `RowwiseParallel` its columns, `SequenceParallel` runs a LayerNorm on `Shard(1)` (sequence) inputs.
# One detail shows what "the same split" means: DTensor cuts a weight into t *contiguous* pieces, so
# `c_attn`'s rows were first reordered rank-major, [q₀ k₀ v₀ | q₁ k₁ v₁], to give each rank whole heads
# (`course.parallel.tp_experiments.check_dtensor`).
#
# ## 2. Every collective counted
#
# `course.parallel.comm.Comm` counts each call on the tensor-parallel group and the bytes a rank
# sends (ring algorithm: an all-reduce of n bytes sends 2(t−1)/t·n). One block, forward then backward:

# %%
# NBVAL_CHECK_OUTPUT
t = 2
b, s, h = setup.batch_size, setup.block_size, setup.n_embd
for kind in ("tensor", "sequence"):
    blk = two.values[0]["block"][kind]
    formula = tensor_parallel_bytes(b, s, h, t, bytes_per_el=8, sequence_parallel=kind == "sequence")
    print(f"{kind:8s} parallel: forward {blk['forward']['calls']}, backward {blk['backward']['calls']}; "
          f"{blk['forward']['bytes'] + blk['backward']['bytes']:,.0f} bytes = formula {formula['total']:,.0f}")
    assert blk["forward"]["bytes"] + blk["backward"]["bytes"] == formula["total"]
tp_block = two.values[0]["block"]["tensor"]
assert tp_block["forward"]["calls"] == {"all_reduce": 2} and tp_block["backward"]["calls"] == {"all_reduce": 2}

# %%
tp_bytes = tensor_parallel_bytes(b, s, h, t, bytes_per_el=8)
sp_bytes = tensor_parallel_bytes(b, s, h, t, bytes_per_el=8, sequence_parallel=True)
display(Markdown(
    f"Exactly **2 all-reduces forward and 2 backward** per block: 4 × 2(t−1)/t·b·s·h elements = "
    f"8·b·s·h·(t−1)/t = {tp_bytes['total'] / 8:,.0f} elements, {tp_bytes['total']:,.0f} bytes in float64 "
    f"(in 16-bit: 16·b·s·h·(t−1)/t bytes). Sequence parallelism replaces each all-reduce by a reduce-scatter "
    f"and an all-gather, which send the same bytes; the {sp_bytes['regather']:,.0f} bytes more are the two "
    f"*re-gathers*: like Megatron-LM, a column-parallel linear keeps only its input's sequence shard for "
    f"backward and gathers it again there, which is what makes its memory 1/t (next section)."))

# %% [markdown]
# ## 3. Sequence parallelism: the activations between the linears, divided by t
#
# Under tensor parallelism the LayerNorms and dropouts run on the whole (B, T, C) activation on every
# rank: Korthikanti et al. 2022 (§4.2.1, Table 2) count sbh(10 + 24/t + 5as/(ht)) bytes per layer, where
# the 10·sbh is *not* divided by t: the two LayerNorms' inputs (4sbh), their outputs, which are the inputs
# of the two column-parallel linears (4sbh), and the two dropout masks (2sbh) (§4.1, §4.2.1–4.2.2). Sequence parallelism splits those tokens too:
# sbh/t·(34 + 5as/h). Measured on each rank (what autograd saves, `course.measure.saved_tensors`,
# float32, dropout 0.1) against `course.costs.tensor_parallel_layer_bytes`, the same accounting
# for this course's block (it reproduces the paper's table in the paper's setting: test_tensor_parallel):

# %%
mem = two.values[0]["memory"]
mp.plot_saved_by_part(mem, s, b, h, setup.n_head, t);

# %%
# NBVAL_CHECK_OUTPUT
for label, sp in (("tensor", False), ("sequence", True)):
    want = sum(tensor_parallel_layer_bytes(s, b, h, setup.n_head, t, sequence_parallel=sp, bytes_per_el=4,
                                           dropout=True).values())
    assert mem[label]["block"] == want, (label, mem[label]["block"], want)
for m in ("ln_1", "ln_2", "attn.resid_dropout", "mlp.dropout"):
    assert mem["sequence"]["by_module"][f"blocks.0.{m}"] * t == mem["tensor"]["by_module"][f"blocks.0.{m}"]
assert mem["sequence"]["block"] * t == mem["whole"]["block"]
print("measured bytes per rank = formula under tensor and sequence parallelism; with sequence parallelism")
print("LayerNorm and dropout bytes are 1/t of tensor parallel's, and the whole block is 1/t of one process's")

# %% [markdown]
# ## 4. Communication per layer: tensor vs data vs context parallelism
#
# The same work — one block, forward and backward, on B sequences of T tokens — split three ways on
# 2 ranks: by matrices (tensor), by sequences (data parallelism: each rank half the batch, then an
# all-reduce of the block's gradients) and by tokens (context parallelism, attention only: ring and
# Ulysses). Bars: bytes counted by `Comm`; black: formula; above each bar, the seconds its
# communication took here (gloo between processes on one CPU: a shape, not a network).

# %%
# NBVAL_IGNORE_OUTPUT
measured = two.values[0]["per_layer"]
formulas = mp.layer_formulas(setup, 2)
fig, ax = plt.subplots(figsize=(8, 3.5))
mp.plot_layer_comm(measured, formulas, ax=ax)
ax.set_title(f"One layer, b={b}, s={s}, h={h}, float32, 2 ranks");

# %%
# NBVAL_CHECK_OUTPUT
for name, want in formulas.items():
    assert all(r["per_layer"][name]["bytes"] == want for r in two.values), (name, want)
print("bytes per layer counted on both ranks = formula for tensor, sequence, data, ring and Ulysses")

# %% [markdown]
# Which is cheaper depends on the shape: tensor and context parallelism send bytes in proportion to
# the **tokens** (b·s·h per layer, *every micro-batch*), data parallelism in proportion to the
# **parameters** (12h² per layer, once per optimizer step, and it can overlap with backward). At this
# toy width the parameters are few; at GPT-3's they are not. What decides where each one can run is
# the link. NVIDIA's data sheets: a DGX A100 joins its 8 GPUs by NVLink at 600 GB/s per GPU (both
# directions together) and the servers by one 200 Gb/s HDR InfiniBand NIC per GPU (`course.costs.LINKS`).
# One GPT-3 layer (Brown et al. 2020, Table 2.1: h = 12288, 96 heads, 2048 tokens), one sequence per
# micro-batch, 16-bit, beside the layer's compute time at the A100's peak (312 TFLOP/s dense bf16; Megatron-LM's
# runs reach 43–52% of it end to end, Narayanan et al. 2021, Table 1):

# %%
rows = mp.gpt3_layer_table()
display(Markdown(mp.markdown_table(rows)))
tp, dp = rows[0], rows[-1]
nv, ib = [k for k in tp if "NVLink" in k][0], [k for k in tp if "InfiniBand" in k][0]
display(Markdown(
    f"Tensor parallelism over 8 GPUs sends {tp['MB sent per GPU']:.0f} MB per layer per micro-batch, on the "
    f"critical path (each all-reduce waits for the matmul before it, and the next one waits for it): "
    f"**{tp[nv]:.1f} ms over NVLink** but **{tp[ib]:.1f} ms over InfiniBand**, against "
    f"{tp['ms of compute at peak']:.1f} ms of computation at full peak. Across nodes the GPUs would mostly wait; "
    f"inside a node the communication costs {tp[nv] / tp['ms of compute at peak']:.0%} of the compute. "
    f"Data parallelism's {dp['MB sent per GPU']:,.0f} MB per layer look worse, but they are sent once per "
    f"optimizer step, against {dp['ms of compute at peak']:,.0f} ms of that step's computation per layer "
    f"({dp[ib] / dp['ms of compute at peak']:.0%} on InfiniBand), and they overlap with backward. This is why "
    f"Megatron-LM puts tensor parallelism inside a node and pipeline and data parallelism across nodes "
    f"(Narayanan et al. 2021, §3.2, takeaway #1)."))

# %% [markdown]
# **A correction to the essay this course grew from.** It says GPT-3 was trained "data parallel inside
# each node and model parallel between nodes". The GPT-3 paper says otherwise (Brown et al. 2020,
# §2.3): *"To train the larger models without running out of memory, we use a mixture of model
# parallelism within each matrix multiply and model parallelism across the layers of the network."*
# Model parallelism within each matrix multiply is the tensor parallelism of this lesson, and the
# numbers above say where it has to live: inside the node, on NVLink. (The paper does not spell out the
# layout across nodes; Megatron-LM's published layout is tensor inside, pipeline and data across.)
#
# ## 5. Context parallelism: ring attention
#
# With very long sequences even one layer's activations outgrow a GPU, and sequence parallelism still
# gathers the whole sequence inside attention. Context parallelism never does: each of N ranks keeps
# T/N tokens. Everything but attention is per token anyway; attention runs as a **ring**
# (`course.parallel.context.ring_attention`): each rank keeps its queries, the keys and values go round
# (rank r sends to r+1 while it computes with the block it holds), and the N partial results are
# merged exactly with the online-softmax rule: lse = log(e^lse_a + e^lse_b),
# out = e^(lse_a − lse)·out_a + e^(lse_b − lse)·out_b. Backward is the same ring, with the gradients of
# the travelling keys and values travelling along.
#
# With a causal mask the plain split is unfair: rank N−1's queries see every key, rank 0's only its
# own. The **zig-zag** split cuts the sequence into 2N chunks and gives rank i chunks i and 2N−1−i. One
# launch of 4 ranks: both layouts vs full attention (float64), the work per rank, the timeline,
# memory per rank at several lengths, and the whole model trained with its sequences split.

# %%
# NBVAL_IGNORE_OUTPUT
T_RING, B_RING, H_RING, D_RING = 1024, 1, 4, 32
lengths = (256, 512, 1024, 2048)
four = launch.run(mp.four_rank_run, 4, Setup(n_head=4, dtype="float64"), T_RING, B_RING, H_RING, D_RING, lengths,
                  timeout=900)
dense = [attention_memory(B_RING, H_RING, T, D_RING) for T in lengths]  # one process holds everything
print(f"4 ranks: launch + all checks in {four.seconds:.0f} s")

# %%
# NBVAL_CHECK_OUTPUT
for r in four.values:
    for layout in ("contiguous", "zigzag"):
        assert max(r[layout]["diffs"].values()) < 1e-12, (layout, r[layout]["diffs"])  # float64, exact merge
    assert r["train"]["max_abs_diff"] < TOL
print("ring attention on 4 ranks = full attention (forward, dq, dk, dv) within 1e-12 for both layouts;")
print("the transformer trained 3 steps with zig-zag ring attention = one process on whole sequences")

# %%
# NBVAL_IGNORE_OUTPUT
fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [3, 1]})
mp.plot_ring_timeline([r["zigzag"]["spans"] for r in four.values], ax=axes[0],
                      title=f"zig-zag ring attention, T={T_RING}, 4 ranks, measured")
mp.plot_balance({layout: [r[layout]["stats"] for r in four.values] for layout in ("contiguous", "zigzag")},
                D_RING, ax=axes[1])
fig.tight_layout()

# %% [markdown]
# Left: each rank's four forward steps (blue) and four backward steps (orange); in red the hop of the
# next key/value block, posted before the step's computation and waited for after it (on GPUs the
# transfer hides behind the computation when a step's matmuls take longer than sending its block;
# here the same two cores do both). Right: attention FLOPs each rank computes under the causal mask.

# %%
# NBVAL_CHECK_OUTPUT
from course.costs import attention_pair_flops
work = {layout: [attention_pair_flops(r[layout]["stats"]["pairs_computed"], D_RING) for r in four.values]
        for layout in ("contiguous", "zigzag")}
spread = {k: max(v) / min(v) for k, v in work.items()}
print(f"most / least FLOPs per rank: contiguous {spread['contiguous']:.2f}x, zig-zag {spread['zigzag']:.2f}x")
assert spread["zigzag"] <= 1.1 and spread["contiguous"] >= 2

# %% [markdown]
# Chapter 03's sparse patterns go through the same ring as masks (`ring_attention(..., pattern=)`); a
# step whose tiles are all masked is skipped (the keys still pass through). How many of the 4 steps
# each rank could skip (contiguous layout, T = 512, blocks of 32 tokens; each result checked against
# full attention with the pattern's mask):

# %%
# NBVAL_CHECK_OUTPUT
skips = {name: [r["patterns"][name]["stats"]["steps_skipped"] for r in four.values]
         for name in four.values[0]["patterns"]}
assert all(max(r["patterns"][name]["diffs"].values()) < 1e-12 for r in four.values for name in skips)
display(Markdown(mp.markdown_table([{"pattern": k, **{f"rank {i}": n for i, n in enumerate(v)}} for k, v in skips.items()])))
assert skips["sliding_window"] == [3, 2, 2, 2]  # only its own and the previous rank's keys

# %% [markdown]
# A causal local band (GPT-3's "locally banded" layers, `sliding_window`) needs only the own and the
# previous rank's keys once the window fits inside one rank's tokens, and so does a dilated band; plain
# causal attention skips the future as always. Global tokens (Longformer, BigBird) and strided patterns
# reach far back from almost every query block, so they skip little beyond what causality already gives.
#
# **Memory per rank.** What attention keeps for backward, measured (points) against the formulas
# (lines): the whole attention written out on one rank keeps the T×T weights; ring attention keeps its
# T/N queries, keys, values, outputs and one log-sum-exp per row. Hollow points: the peak of live
# tensors over forward + backward (`course.measure.LiveTensors`), including the transient scores of one tile.

# %%
fig, ax = plt.subplots(figsize=(8, 4.5))
mp.plot_memory_vs_length(dense, four.values[0]["memory"], B_RING, H_RING, D_RING, ax=ax);

# %%
# NBVAL_CHECK_OUTPUT
for layout, points in four.values[0]["memory"].items():
    for p in points:
        assert p["saved"] == ring_attention_saved_bytes(B_RING, p["T"], H_RING * D_RING, H_RING, 4), (layout, p)
for d in dense:
    assert d["saved"] == layer_activation_bytes(d["T"], B_RING, H_RING * D_RING, H_RING, core="matmul")["attention core"]
longest = dense[-1], four.values[0]["memory"]["zigzag"][-1]
print(f"T={longest[0]['T']}: peak per rank of 4 / one rank's peak = {longest[1]['peak'] / longest[0]['peak']:.3f}")
assert longest[1]["peak"] <= (1 / 4 + 0.10) * longest[0]["peak"]
print("(below 1/4: one rank writing attention out keeps the T×T weights, which grow as T², the ring keeps none)")

# %% [markdown]
# **Ulysses** (Jacobs et al. 2023) splits the same way but trades tokens for heads with an all-to-all
# before attention (each rank then holds the whole sequence for H/N heads, and any attention core runs
# unchanged, block-sparse included) and back after. Its bytes per rank shrink as 1/N at a fixed length
# (Jacobs et al. 2023, §3.2: 4·T·h/N per link and layer for sequence length T; section 4 shows N = 2 only); the
# price is that N cannot exceed the number of heads (the paper's version needs N to divide them), and each
# rank still holds T×T scores for its heads unless the core is a fused one. It is tested beside the ring in
# `tests/test_context_parallel.py`.
#
# ## What a CPU cannot show
#
# - **Bandwidth and overlap.** gloo moves bytes through one machine's memory; the counts are those of the
#   ring algorithm for the tensors each rank hands to the collective (`course.parallel.comm`), the times are
#   not a network's. On GPUs, tensor parallelism's all-reduces sit between the matmuls on the critical
#   path (Shoeybi et al. 2019, §3); Megatron-LM hides only some of it: sequence parallelism's extra
#   all-gather in backward overlaps the computation of the input's gradient (Korthikanti et al. 2022,
#   §4.2.2; `LinearWithGradAccumulationAndAsyncCommunication` in `megatron/core/tensor_parallel/layers.py`),
#   while ring attention hides its hops behind each step's
#   computation when the block is large enough (Liu et al. 2023, section 3).
# - **Kernels.** Each ring step here writes out one tile's scores; a GPU implementation calls a fused
#   flash-attention kernel per step, so even the transient tile stays small.
#
# Recorded GPU runs of `benchmarks/model_parallel.py` (written by `benchmarks/run_gpu.sh`), if any:

# %%
from course.reference import describe, gpu_reference

print(describe("model_parallel"))
ref = gpu_reference("model_parallel")
if ref is not None and "measured" in ref:
    print({k: v for k, v in ref["measured"].items()})

# %% [markdown]
# ## Summary
#
# - Tensor parallelism = two conjugate functions around column- and row-parallel linears: 2
#   all-reduces per block and direction, 8·b·s·h·(t−1)/t elements per layer, equal results (sections 1–2).
# - Sequence parallelism: the same bytes (plus two re-gathers), and every activation per rank divided
#   by t, as Korthikanti et al. count (section 3).
# - Tensor parallelism's bytes grow with the tokens and block every layer: NVLink, not InfiniBand
#   (section 4); GPT-3 used model parallelism within each matrix multiply and across layers (§2.3).
# - Ring attention splits the sequence, merges partial softmaxes exactly, balances causal work by the
#   zig-zag split, and keeps per rank only its T/N tokens' queries, keys, values, outputs and one
#   log-sum-exp per row, never a T×T tensor (section 5).
#
# ## Your turn
#
# 1. Put a 2D mesh `Mesh(data=2, tensor=2)` on 4 ranks: which groups does each rank join, and which of
#    the two would you place inside a node (use `Mesh(..., gpus_per_node=2).check_within_node`)?
# 2. Add Megatron's RNG tracker: under sequence parallelism, give each rank its own dropout stream
#    for the sequence-parallel regions and check that the ranks' masks differ.
# 3. Ring attention's hop can hide behind a step when the step computes longer than the hop sends:
#    from `costs.LINKS` and a GPU's peak, find the smallest T/N for which that holds on NVLink and on
#    InfiniBand (Liu et al. 2023 derive the same condition).
# 4. Measure how the zig-zag balance changes with a sliding-window pattern instead of plain causal.
