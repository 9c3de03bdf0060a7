# %% [markdown]
# # 05 · Data parallelism, gradient accumulation and sharded optimizers (ZeRO / FSDP)
#
# A model as large as GPT-3 is trained on many GPUs at once. (The GPT-3 paper, Brown et al. 2020 §2.3,
# gives no count, only "V100 GPU's on part of a high-bandwidth cluster provided by Microsoft";
# Narayanan et al. 2021 §5.1 estimate that its 300B tokens would take 34 days on 1,024 A100s.)
# The simplest way to use more than one device is **data parallelism**: every worker (a *rank*)
# holds a copy of the model, trains on its own slice of the batch, and the ranks average their
# gradients before the optimizer step, so all copies stay identical.
#
# Everything below runs for real: `course.parallel.launch.run` starts N Python processes that talk
# through `torch.distributed` (gloo on a CPU, NCCL on GPUs), exactly the code `torchrun` starts on
# a cluster:
#
# ```
# torchrun --standalone --nproc-per-node=2 -m course.parallel.experiments --strategies bucketed,zero3
# ```
#
# Every strategy is applied to the unchanged model by `course.parallelize` and trained by the same
# loop, `course.train.train`, that trains one process in lessons 00–04: the wrappers honour the
# interface of PyTorch's `DistributedDataParallel` and FSDP (gradients averaged when `backward()`
# returns, `no_sync()` for accumulation, a plain optimizer over `model.parameters()`).
#
# What you will see: (1) 1, 2 and 4 ranks give the same training; (2) a measured timeline of
# compute and all-reduce, naive vs bucketed-with-overlap; (3) how many bytes each strategy sends,
# counted, and the ring all-reduce's traffic checked against its formula; (4) how ZeRO-1/2/3 remove
# the N copies of optimizer state, gradients and weights; (5) gradient accumulation; (6) what a
# laptop CPU cannot show.

# %%
import matplotlib.pyplot as plt
from IPython.display import Markdown

from course.costs import model_state_bytes
from course.device import profile
from course.lessons import data_parallel as dpl
from course.parallel import launch, ring
from course.parallel.experiments import Setup, compare_many, run, run_many

# gloo ranks run on the CPU: use the CPU sizes there, the GPU profile only when NCCL has a GPU per rank
prof = profile() if launch.backend(4) == "nccl" else profile("cpu")
THREADS = 1  # one thread per rank: N=1 gets no more cores than each rank of N=2 (and 2 cores are shared)
setup = Setup(n_layer=prof.n_layer, n_head=prof.n_head, n_embd=prof.n_embd, block_size=prof.block_size // 2,
              batch_size=prof.batch_size, steps=30, lr=1e-3, warmup_steps=5, data="text", bucket_mb=1.0,
              dtype="float64")
print(prof)
print(f"global batch {setup.batch_size} sequences x {setup.block_size} tokens, backend {launch.backend(2)}")

# %% [markdown]
# ## 1. N ranks, one model
#
# Rank r takes rows r·B/N … (r+1)·B/N of the same global batch. The mean of the N per-rank gradients
# is the gradient of the mean loss over all B sequences, so after the all-reduce every rank takes the
# step a single process would take on the full batch. We train 30 steps on Python's own documentation
# with 1, 2 and 4 ranks (bucketed data parallelism, section 2) at the same global batch, with the same
# recipe (AdamW with decay on matrices, warmup + cosine, clipping at 1.0).
#
# The claim is mathematical equality, so this run is in **float64**. In float32 the curves would still
# lie on top of each other but not be bit-identical: each rank sums its own slice, so additions happen
# in a different order, and Adam, which divides by each gradient's running RMS, can enlarge tiny
# differences on near-zero gradients. In float64 summation-order differences are ~1e-16 relative; a
# missing or doubled reduction would move parameters by about the learning rate (1e-3) at once.

# %%
# NBVAL_IGNORE_OUTPUT
curves = {}
for n in (1, 2, 4):
    res = launch.run(run, n, setup, "bucketed", timeout=900, threads=THREADS)
    curves[n] = res.values[0]
    print(f"{n} rank(s): final loss {curves[n]['losses'][-1]:.4f}, launch + training {res.seconds:.0f} s")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
for n, r in curves.items():
    ax.plot(r["losses"], label=f"{n} rank(s), {setup.batch_size // n} sequences each",
            linestyle=["-", "--", ":"][[1, 2, 4].index(n)], linewidth=2)
ax.set_xlabel("optimizer step")
ax.set_ylabel("training loss (nats/token)")
ax.set_title(f"Same global batch ({setup.batch_size} sequences): same curve")
ax.legend();

# %%
# NBVAL_CHECK_OUTPUT
gaps = dpl.largest_gaps(curves)
assert gaps["loss"] < 1e-9 and gaps["params"] < 1e-9, gaps
print("1, 2 and 4 ranks: losses and parameters agree to 1e-9 (float64)")

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"Largest loss difference from one rank: {gaps['loss']:.1e}; largest parameter difference: "
         f"{gaps['params']:.1e}, the size of float64 rounding.")

# %% [markdown]
# ## 2. What the all-reduce costs, and hiding it behind backward
#
# **Naive** data parallelism waits for backward to finish, then all-reduces each of the model's
# gradient tensors one after another. **Bucketed** data parallelism (what `DistributedDataParallel`
# does, Li et al. 2020, "PyTorch Distributed", §3.2) groups parameters into buckets of `bucket_mb` in
# reverse order, registers a hook that fires when a gradient is final, and starts a bucket's
# all-reduce the moment its last gradient arrives: the last layers' gradients travel while backward
# is still computing the first layers. `course.parallel.comm.Comm` records every collective on a
# timeline; the lesson adds forward and backward spans from outside. Below: one measured step on 2 ranks.

# %%
# NBVAL_IGNORE_OUTPUT
measure = Setup(**{**setup.__dict__, "steps": 3, "warmup_steps": 1, "dtype": "float32"})  # the middle step is measured
measured = {n: launch.run(run_many, n, measure, ("naive", "bucketed", "zero1", "zero2", "zero3"),
                          timeout=900, threads=THREADS).values for n in (2, 4)}
two = measured[2]

# %%
fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
for ax, name in zip(axes, ("naive", "bucketed")):
    dpl.plot_timeline([rank[name]["spans"] for rank in two], ax=ax,
                      title=f"{name}: {two[0][name]['comm']['calls']['all_reduce']} all-reduce calls, "
                            f"step {1e3 * two[0][name]['step_s']:.0f} ms")
fig.tight_layout()

# %% [markdown]
# In the naive step the red all-reduce lane starts only after the orange backward bar ends, and it
# is made of many small calls, each paying a fixed latency. In the bucketed step a few larger
# all-reduces start *inside* backward. On this CPU both ranks, their compute and gloo's
# communication threads share the same cores, so overlap can only hide part of the
# communication; on GPUs the all-reduce runs on its own stream and on NVLink/InfiniBand hardware
# while the GPU computes (section 6).

# %%
# NBVAL_CHECK_OUTPUT
for rank in two:
    assert dpl.comm_after_backward(rank["naive"]["spans"]) and dpl.comm_inside_backward(rank["bucketed"]["spans"])
print("naive: every all-reduce after backward; bucketed: the first all-reduce starts during backward")

# %% [markdown]
# ## 3. Bytes per step: data parallelism vs ZeRO
#
# An all-reduce is a reduce-scatter followed by an all-gather. With the ring algorithm (Patarasuk &
# Yuan 2009) each rank sends (N−1)/N of the data in each half: **2(N−1)/N·Ψ** elements per step for
# Ψ parameters. That barely depends on N: adding ranks does not make the all-reduce cheaper per rank.
#
# **ZeRO** (Rajbhandari et al. 2020, §5) stops keeping N copies of the model state:
# - **ZeRO-1** shards the optimizer state: reduce-scatter the gradients, each rank updates its 1/N
#   slice of the parameters, all-gather the parameters. Same two halves: the same bytes as DP.
# - **ZeRO-2** also shards the gradients: a layer's gradient is reduce-scattered as soon as backward
#   has produced it and the full gradient is freed. Still the same bytes.
# - **ZeRO-3** also shards the parameters: a layer is all-gathered just before its forward and
#   freed after, all-gathered again in backward, then its gradient is reduce-scattered:
#   **3(N−1)/N·Ψ**, 1.5x DP (the paper's 2Ψ vs 3Ψ, §7). PyTorch's FSDP with its default
#   `FULL_SHARD` strategy (FSDP2's `fully_shard`) is ZeRO-3; `SHARD_GRAD_OP` is close to ZeRO-2.
#
# The course's ZeRO (`course.parallel.zero.shard`) changes the model in place the way FSDP2 does:
# every parameter is cut along its first dimension, the registered `Parameter` becomes this rank's
# rows, so an ordinary AdamW over `model.parameters()` keeps optimizer state for 1/N of the model.
# Counted per call by `Comm` (fp32 = 4 bytes per element), at 2 and 4 ranks:

# %%
psi = two[0]["naive"]["psi"]
fig, ax = plt.subplots(figsize=(7, 4))
dpl.plot_comm_bytes({n: values[0] for n, values in measured.items()}, psi, ax=ax)
ax.set_title(f"Communication per step, Ψ = {psi:,} parameters");

# %%
# NBVAL_CHECK_OUTPUT
for n, values in measured.items():
    for name, r in values[0].items():
        factor = 3 if name == "zero3" else 2
        assert r["comm"]["total_bytes"] == factor * (n - 1) / n * r["psi"] * 4, (n, name)
print("counted bytes = 2(N-1)/N·Ψ (DP, ZeRO-1, ZeRO-2) and 3(N-1)/N·Ψ (ZeRO-3) at N = 2 and 4")

# %% [markdown]
# `Comm` counts each collective call with the ring formula, so the check above shows the *schedule*
# of collectives is right (which tensors, how often), not that a ring sends 2(N−1)/N of a tensor.
# To check that, `course.parallel.ring.ring_all_reduce` writes the ring out with point-to-point
# `send`/`recv` between neighbours, 2(N−1) steps, and counts the bytes where they leave each rank:

# %%
# NBVAL_CHECK_OUTPUT
for n in (2, 3, 4):
    for r in launch.run(ring.check_against_torch, n, 1200, timeout=120).values:
        assert r["max_abs_diff"] < 1e-12  # float64: the same sum as dist.all_reduce, up to summation order
        assert r["sent_bytes"] == 2 * (n - 1) / n * r["n_bytes"], r
    print(f"N={n}: the ring sends 2(N-1)/N = {2 * (n - 1) / n:.2f} of the tensor per rank, and sums like all_reduce")

# %% [markdown]
# (ZeRO's Ψ includes padding: every parameter's first dimension is padded to a multiple of N.)
#
# ## 4. Memory per rank: what ZeRO removes
#
# With mixed-precision Adam each parameter costs 2 bytes (fp16 weight) + 2 (fp16 gradient) + K = 12
# (fp32 master weight, momentum, variance). Per rank, for Ψ parameters on N ranks (ZeRO, §5 and fig. 1):
#
# | | params | grads | optimizer | |
# |---|---|---|---|---|
# | DP | 2Ψ | 2Ψ | KΨ | (2+2+K)Ψ |
# | ZeRO-1 | 2Ψ | 2Ψ | KΨ/N | 2Ψ+2Ψ+KΨ/N |
# | ZeRO-2 | 2Ψ | 2Ψ/N | KΨ/N | 2Ψ+(2+K)Ψ/N |
# | ZeRO-3 | 2Ψ/N | 2Ψ/N | KΨ/N | (2+2+K)Ψ/N |
#
# The code here trains in fp32 on a CPU: 4 bytes of weight (which is its own master copy), 4 of
# gradient and 8 of AdamW state, i.e. the same formulas with (4, 4, 8) in place of (2, 2, 12).
# Below: the bytes of the tensors each rank actually holds after the gradient sync (parameters,
# gradients, `exp_avg` + `exp_avg_sq`: `course.measure.state_bytes`), stacked; the black tick is the formula.

# %%
fig, ax = plt.subplots(figsize=(9, 4))
dpl.plot_memory({n: values[0] for n, values in measured.items()}, ax=ax)
ax.set_title("Model state per rank, measured (bars) vs formula (ticks)");

# %%
# NBVAL_CHECK_OUTPUT
for n, values in measured.items():
    for rank in values:
        for stage, name in enumerate(("naive", "zero1", "zero2", "zero3")):
            mem, want = rank[name]["memory"], model_state_bytes(rank[name]["psi"], "fp32", stage, n)
            assert all(mem[k] == want[k] for k in ("params", "grads", "optimizer")), (n, name, mem, want)
print("measured params / grads / optimizer bytes = the ZeRO formulas (fp32: P=4, G=4, K=8) on every rank")

# %% [markdown]
# ### The ZeRO paper's example
#
# 7.5 billion parameters on 64 GPUs with mixed-precision Adam (K = 12), from the same formula
# (`course.costs.model_state_bytes`, checked in the tests against the paper's figure 1):

# %%
# NBVAL_CHECK_OUTPUT
gb = {stage: model_state_bytes(7.5e9, "mixed", stage, 64)["total"] / 1e9 for stage in range(4)}
for stage, label in enumerate(("DP", "ZeRO-1", "ZeRO-2", "ZeRO-3")):
    print(f"{label:7s} {gb[stage]:6.1f} GB per GPU")
assert [round(v, 1) for v in gb.values()] == [120.0, 31.4, 16.6, 1.9]

# %%
# NBVAL_CHECK_OUTPUT
Markdown(f"An 80 GB GPU cannot hold the {gb[0]:.0f} GB of plain data parallelism; with ZeRO-2 "
         f"({gb[2]:.1f} GB) it holds the model state with room for activations; ZeRO-3 ({gb[3]:.1f} GB) makes "
         f"the per-GPU share shrink with every GPU added, at the price of 1.5x the communication.")

# %% [markdown]
# ## 5. Gradient accumulation: fewer all-reduces
#
# When the batch you want does not fit, split it into M micro-batches, run forward and backward on
# each, and let the gradients add up before one optimizer step. Only the last micro-batch needs the
# all-reduce: inside `no_sync()` the hooks skip communication (the loop calls it for every
# micro-batch but the last). Without it, every micro-batch all-reduces: the same result for M times
# the bytes. 2 ranks, M = 4 micro-batches each, float64 for the equality:

# %%
accum = Setup(**{**setup.__dict__, "steps": 3, "warmup_steps": 1, "micro_batches": 4})
jobs = [(accum, ("bucketed",)), (Setup(**{**accum.__dict__, "sync_every_micro_batch": True}), ("bucketed",))]
once, every = [r["results"]["bucketed"] for r in launch.run(compare_many, 2, jobs, timeout=900,
                                                                threads=THREADS).values[0]]
fig, ax = plt.subplots(figsize=(6, 3))
bars = {"no_sync until the last\nmicro-batch": once, "all-reduce every\nmicro-batch": every}
ax.bar(list(bars), [r["comm"]["total_bytes"] / 1e6 for r in bars.values()], color=["tab:green", "tab:red"])
ax.set_ylabel("bytes sent per rank per step (MB)")
ax.set_title("4 micro-batches per step, 2 ranks");

# %%
# NBVAL_CHECK_OUTPUT
assert once["max_abs_diff"] < 1e-9 and every["max_abs_diff"] < 1e-9  # both = one process, full batch
assert every["comm"]["calls"]["all_reduce"] == 4 * once["comm"]["calls"]["all_reduce"]
assert every["comm"]["total_bytes"] == 4 * once["comm"]["total_bytes"]
print("same parameters as one process on the full batch; no_sync: 4x fewer all-reduce calls and bytes")

# %% [markdown]
# ## 6. What a CPU cannot show
#
# - **Bandwidth.** Here gloo moves bytes between processes of one machine through its memory. The
#   byte counts above are what real hardware moves, but the time is not: GPUs in one server talk
#   over NVLink (NVIDIA H100 data sheet: 900 GB/s per GPU, the bidirectional total), servers over
#   InfiniBand (a DGX H100 has eight 400 Gb/s NDR links, one per GPU, NVIDIA DGX H100 user guide).
#   The all-reduce time is roughly bytes / bandwidth, so it does not shrink with N. Chapter 06
#   measures these costs per parallel dimension and chapter 08 puts them into a step-time simulator.
# - **Overlap.** On a GPU the all-reduce runs on a separate CUDA stream and the network hardware moves
#   the data while the GPU keeps computing, so bucketing can hide nearly all of it. On 2 CPU cores
#   compute and communication compete for the same cores: the timeline shows the structure, not the
#   benefit.
# - **Memory pressure.** Our model is a few MB: ZeRO's savings are measured exactly, but nothing here
#   would run out of memory without them.
# - **Multi-node.** `torchrun --nnodes=2 --nproc-per-node=8 --rdzv-endpoint=host:port -m ...` runs the
#   same code across machines; nothing in `course/parallel` changes (chapter 08 does it for real).
#
# For a sense of scale, the same formulas at GPT-3's size (arithmetic, not a measurement; GPT-3 ran
# on V100s, which have no bf16, so its 16-bit gradients were fp16 — 2 bytes either way):

# %%
# NBVAL_CHECK_OUTPUT
Markdown(dpl.gpt3_all_reduce_sentence(n_params=174.6e9, world=1024, link_gb_s=50))

# %%
from course.reference import describe, gpu_reference

print(describe("data_parallel"))
ref = gpu_reference("data_parallel")
if ref is not None and "measured" in ref:
    print({k: v for k, v in ref["measured"].items()})

# %% [markdown]
# ## Summary
#
# - N ranks x B/N sequences + an averaged gradient = one process x B sequences (section 1), with the
#   same loop and recipe as one process.
# - The all-reduce sends 2(N−1)/N·Ψ per rank per step whatever N is — counted, and checked against a
#   ring written out with point-to-point sends; bucketing starts it during backward so it can hide
#   behind compute (section 2; `benchmarks/data_parallel.py` times it against PyTorch's DDP).
# - ZeRO-1/2 remove the copies of optimizer state and gradients for free in bytes; ZeRO-3/FSDP remove
#   the weights too, for 1.5x the bytes (sections 3, 4).
# - Gradient accumulation with `no_sync` pays one all-reduce per optimizer step (section 5).
