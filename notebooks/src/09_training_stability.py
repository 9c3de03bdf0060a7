# %% [markdown]
# # 09 · Training big models stably and fast: hyperparameters, monitoring, failures and recovery
#
# Scale alone does not make a model: the **learning rate, batch size, number of iterations and
# initialization** decide whether training converges at all, and long runs meet **numerical errors,
# loss spikes, bad data, overfitting and hardware faults**, countered with clipping, regularization,
# dropout, noise injection, monitoring and rollback. This lesson turns each of those claims into a
# measured experiment on the course's small transformer (`course.model`) trained by the one loop
# (`course.train.train`), on the offline corpus of Python's own documentation.
#
# One rule throughout: **two runs that differ only in their seed end at different losses**, so no
# conclusion is drawn from one run. Every configuration runs over three seeds and is shown with its
# mean, its sample standard deviation and a 95% confidence interval for the mean (Student's t,
# `course.stability.seeds`); a difference counts when it is large against that spread.
#
# 1. learning rate: a sweep, a range test (Smith 2017), schedules (cosine, linear, WSD);
# 2. initialization: PyTorch's default, GPT-2's scaled residuals, a deliberately bad one, per layer;
# 3. batch size against gradient accumulation at an equal number of tokens;
# 4. mixed precision: bf16 autocast, fp16 with loss scaling, ZeRO-3 with 16-bit compute beside FSDP2;
# 5. throughput levers: data format (memory-mapped tokens), prefetch, batch, accumulation, precision,
#    and a quality filter measured on validation loss;
# 6. a monitored run with a NaN and a loss spike injected, caught and handled, on a dashboard;
# 7. checkpoints: a run SIGKILLed and resumed bit for bit, damaged checkpoints refused, distributed
#    checkpoints resharded from 4 ranks to 2, asynchronous saves, and a rank that dies under torchrun;
# 8. overfitting a tiny training set, and what dropout, weight decay and gradient noise do to it.
#
# The library: `course/train.py` (schedules, hooks, loss scaling, resume), `course/stability/` (seeds,
# init, monitor, anomalies, hyperparameter tools), `course/loader.py` and `course/quality.py` (data),
# `course/checkpoint.py` and `course/parallel/dcp.py` (checkpoints), `course/lessons/stability.py`,
# `course/lessons/throughput.py` and `course/lessons/fault_tolerance.py` (this lesson's experiments and figures).

# %%
import math

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown

from course.device import profile
from course.lessons import stability as ls
from course.stability import (AnomalyGuard, FaultInjector, GradientNoise, Monitor, compare, layer_stats_at_init,
                              lr_range_test, separated)
from course.train import lr_at, train

prof = profile()
if prof.device.type == "cpu":
    torch.set_num_threads(1)  # 64-wide matmuls gain little from a second thread; one keeps runs steady on shared cores
setup = ls.Setup.from_profile(prof)
SEEDS = (0, 1, 2)
print(prof)
print(setup)

# %% [markdown]
# ## 1. The learning rate decides convergence
#
# GPT-3 trained its models with AdamW (β = 0.9, 0.95), clipping the global gradient norm at 1.0,
# a linear warmup over the first 375 million tokens and a cosine decay to 10% of the peak rate
# (Brown et al. 2020, appendix B), and it lowered the peak rate as the models grew, from 6.0e-4 for
# the 125M model to 0.6e-4 for 175B, while raising the batch from 0.5M to 3.2M tokens (Table 2.1;
# §2.3: "larger models can typically use a larger batch size, but require a smaller learning rate").
# Our recipe is the same loop at toy scale. First a sweep of the peak rate, each over three seeds,
# and the highest rate once more without clipping.

# %%
lrs = (1e-3, 3e-3, 1e-2, 3e-2)
configs = {f"lr {lr:g}": (lambda seed, lr=lr: setup.run(seed, lr=lr)) for lr in lrs}
configs[f"lr {lrs[-1]:g}, no clipping"] = lambda seed: setup.run(seed, lr=lrs[-1], grad_clip=None)
sweep = compare(configs, SEEDS, progress=True)
ls.plot_stats(sweep, title=f"{setup.steps} steps, warmup {setup.warmup_steps} + cosine, 3 seeds each")
plt.show()
Markdown(ls.stats_table(sweep))

# %%
# NBVAL_IGNORE_OUTPUT
by_lr = {lr: sweep[f"lr {lr:g}"]["val"] for lr in lrs}
best_lr = min(by_lr, key=lambda lr: by_lr[lr].mean)
clip, noclip = sweep[f"lr {lrs[-1]:g}"]["val"], sweep[f"lr {lrs[-1]:g}, no clipping"]["val"]
Markdown(f"The best peak rate here is **{best_lr:g}** (validation loss {by_lr[best_lr]}); the smallest, "
         f"{lrs[0]:g}, reaches only {by_lr[lrs[0]].mean:.3f} in the same {setup.steps} steps: too small a rate "
         f"wastes the iterations. At {lrs[-1]:g}, clipping at 1.0 gives {clip.mean:.3f} ± {clip.half_width:.3f} and "
         f"no clipping {noclip.mean:.3f} ± {noclip.half_width:.3f}; the intervals "
         f"{'do not overlap' if separated(clip, noclip) else 'overlap, so three seeds cannot tell them apart'}.")

# %% [markdown]
# ### The learning-rate range test
#
# Smith (2017, "Cyclical Learning Rates for Training Neural Networks", §3.3) finds the usable range
# in one run: raise the rate step by step and watch the loss. Where it starts to fall is the lower
# bound; where it stops falling or turns ragged, the upper. `lr_range_test` does it through a hook
# on the same loop, geometrically from 1e-5 to 1 (equal steps per decade).

# %%
rt = lr_range_test(setup.model(0), setup.batch_fn(0), lr_min=1e-5, lr_max=1.0, steps=60, cfg=setup.config())
ax = rt.plot()
ax.axvline(best_lr, color="black", ls="-.", label=f"best of the sweep {best_lr:g}")
ax.legend(fontsize=8)
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
Markdown(f"The smoothed loss falls fastest at {rt.steepest:.1e} and bottoms out at {rt.lr_min_loss:.1e}; "
         f"beyond it the loss rises. The sweep's best rate, {best_lr:g}, lies "
         f"{'inside' if rt.lrs[0] <= best_lr <= rt.lr_min_loss else 'outside'} that range: one cheap run "
         f"narrows a sweep that cost {len(lrs) * len(SEEDS)} runs.")

# %% [markdown]
# ### Schedules: cosine, linear, warmup-stable-decay
#
# `TrainConfig.schedule` picks the shape after warmup. **WSD** (warmup-stable-decay) holds the peak
# rate and decays only in a final cooldown (Hu et al. 2024, MiniCPM §4, whose cooldown is exponential;
# Hägele et al. 2024 §3, whose linear cooldown we use: about 20% of training matches cosine, the default
# `decay_fraction` here). Its
# appeal: the run need not know its length in advance, since any stable-phase state can be cooled
# down. The tests check each schedule against its formula at chosen steps.

# %%
schedules = ("cosine", "linear", "wsd")
sched = compare({name: (lambda seed, name=name: setup.run(seed, lr=best_lr, schedule=name)) for name in schedules}, SEEDS)
fig, axes = plt.subplots(1, 2, figsize=(12, 3.4))
for name in schedules:
    cfg = setup.config(lr=best_lr, schedule=name)
    axes[0].plot([lr_at(s, cfg) for s in range(setup.steps)], label=name)
axes[0].set(xlabel="optimizer step", ylabel="learning rate", title="the schedules")
axes[0].legend()
ls.plot_stats(sched, ax=axes[1], title=f"peak lr {best_lr:g}, 3 seeds each")
plt.show()
Markdown(ls.stats_table(sched))

# %% [markdown]
# ## 2. Weight initialization: where the signal starts
#
# GPT-2 "scale[s] the weights of residual layers at initialization by a factor of 1/√N where N is the
# number of residual layers" (Radford et al. 2019, §2.3): each of the L blocks adds two branches to
# the residual stream, so their output projections start at std 0.02/√(2L) and the stream's variance
# stays near its input's however deep the model. `init_weights(model, scheme)` re-initialises the
# unchanged model from outside; `LayerStats` reads, by forward hooks, the std of each block's output
# and the norm of the gradient flowing into it, here for one batch on a model 4x deeper.

# %%
schemes = ("gpt2", "unscaled", "pytorch", "large")
deep = setup.replace(n_layer=4 * setup.n_layer)
batch = deep.batch_fn(0)("train")
at_init = {s: layer_stats_at_init(deep.model(0, init=s), batch) for s in schemes}
ls.plot_layer_stats(at_init)
plt.show()

# %%
# NBVAL_IGNORE_OUTPUT
g, u, b = at_init["gpt2"], at_init["unscaled"], at_init["large"]
Markdown(f"From the first to the last of {deep.n_layer} blocks the residual stream's std grows "
         f"{g.act_std[-1] / g.act_std[0]:.1f}x with GPT-2's scaling and {u.act_std[-1] / u.act_std[0]:.1f}x "
         f"without it; with N(0, 1) weights it starts at {b.act_std[0]:.0f} (std 1 per weight, summed over "
         f"{setup.n_embd} inputs), and the gradients into block 0 are {b.grad_norm[0] / g.grad_norm[0]:.1f} times "
         f"GPT-2's. PyTorch's default (uniform in ±1/√fan_in) starts the {setup.n_embd}-wide stream at "
         f"{at_init['pytorch'].act_std[0]:.2f}.")

# %%
init_cmp = compare({s: (lambda seed, s=s: setup.run(seed, init=s, lr=best_lr)) for s in schemes}, SEEDS)
ls.plot_stats(init_cmp, title=f"{setup.n_layer} layers, lr {best_lr:g}, {setup.steps} steps, 3 seeds each")
plt.show()
Markdown(ls.stats_table(init_cmp))

# %% [markdown]
# ## 3. Batch size against gradient accumulation, at equal tokens
#
# Accumulating k micro-batches of B/k before one update computes the same gradient as one batch of B
# (the loop divides each micro-batch's loss by k; `tests/test_train.py` checks it), so it buys a
# large batch with the memory of a small one, and in data parallelism one all-reduce per k
# micro-batches. What it does not buy is more updates: at a fixed number of tokens, a smaller batch
# takes more, noisier steps. Below the *critical batch size* the extra steps win; above it they are
# wasted (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", §2). Three runs on
# the same number of tokens:

# %%
B = setup.batch_size
equal_tokens = {
    f"batch {2 * B}, {setup.steps} steps": lambda seed: setup.run(seed, batch_size=2 * B, lr=best_lr),
    f"batch {B // 2} x accumulate 4, {setup.steps} steps": lambda seed: setup.run(seed, batch_size=B // 2, grad_accum=4,
                                                                              lr=best_lr),
    f"batch {B // 2}, {4 * setup.steps} steps": lambda seed: setup.run(seed, batch_size=B // 2, lr=best_lr,
                                                                    max_steps=4 * setup.steps,
                                                                    eval_interval=4 * setup.steps),
}
batch_cmp = compare(equal_tokens, SEEDS)
ls.plot_stats(batch_cmp, title=f"{2 * B * setup.steps * setup.block_size:,} training tokens each, 3 seeds")
plt.show()
Markdown(ls.stats_table(batch_cmp, metrics=("val", "seconds")))

# %%
# NBVAL_IGNORE_OUTPUT
big, acc, small = (batch_cmp[k]["val"] for k in equal_tokens)
Markdown(f"Batch {2 * B} and its accumulated twin end at {big.mean:.3f} and {acc.mean:.3f} (the same "
         f"computation, different batches drawn); {4 * setup.steps} steps of batch {B // 2} on the same tokens "
         f"reach {small.mean:.3f}: at this scale the small batch is {'below' if small.mean < big.mean else 'not below'} "
         f"the critical batch size, and more updates {'win' if small.mean < big.mean else 'do not help'}.")

# %% [markdown]
# ## 4. Mixed precision
#
# GPT-3-scale models train in 16-bit arithmetic. Micikevicius et al. 2018 ("Mixed Precision Training",
# §3) give the recipe: keep an **fp32 master copy of the weights** that the optimizer updates (§3.1; an
# update lr·g is often smaller than fp16 can add to a weight), **scale the loss** so that small gradients
# do not underflow in fp16 (§3.2), and accumulate dot products and reductions in fp32 (§3.3). bfloat16
# (Google's TPU format; Kalamkar et al. 2019, "A Study of BFLOAT16 for Deep Learning Training") keeps
# fp32's 8 exponent bits, so it has fp32's range and needs no loss scaling, at the cost of fewer
# significant bits. The three formats, as torch reports them:

# %%
import math

import torch
from IPython.display import Markdown, display

from course.lessons import throughput as tp

rows = ["| format | significant bits | largest value | smallest normal | rounding unit (eps/2) |", "|---|---|---|---|---|"]
for dt in (torch.float32, torch.bfloat16, torch.float16):
    fi = torch.finfo(dt)
    rows.append(f"| {dt} | {round(1 - math.log2(fi.eps))} | {fi.max:.3g} | {fi.tiny:.3g} | {fi.eps / 2:.3g} |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# The one training loop runs all three: `TrainConfig(autocast_dtype=torch.bfloat16)` wraps forward in
# `torch.autocast` (matmuls in 16 bits, LayerNorm, softmax and the loss in fp32, the parameters stay
# fp32: the master weights), and fp16 adds `train(..., scaler=torch.amp.GradScaler())`. Three seeds each,
# same batches; the memory of one training step is measured with `course.measure.measure_step`.

# %%
# NBVAL_IGNORE_OUTPUT
runs = tp.precision_runs(seeds=(0, 1, 2), steps=20)
display(Markdown(tp.precision_table(runs)))

# %%
import statistics

fp32 = runs["fp32"]
sd = statistics.stdev(fp32["val_loss"])
for name, r in runs.items():
    gap = abs(statistics.mean(r["val_loss"]) - statistics.mean(fp32["val_loss"]))
    # 16-bit training lands where fp32 does: the gap of two 3-seed means has a standard error of
    # sd·sqrt(2/3) = 0.8 sd, so 3 sd is ~3.7 standard errors
    assert gap < 3 * sd, (name, gap, sd)
    assert name == "fp32" or r["memory"].activations < fp32["memory"].activations  # 16-bit activations saved

# %%
act = {k: r["memory"].activations / fp32["memory"].activations for k, r in runs.items()}
speed = {k: statistics.mean(r["tokens_per_s"]) / statistics.mean(fp32["tokens_per_s"]) for k, r in runs.items()}
display(Markdown(
    f"Over three seeds the validation loss of bf16 and fp16 lies within the seeds' spread of fp32 "
    f"(sd {sd:.3f}). The activations kept for backward shrink to {act['bf16 autocast']:.0%} of fp32's "
    f"(matmul outputs are stored in 16 bits; LayerNorm and the loss stay fp32). Speed on this CPU: "
    f"bf16 {speed['bf16 autocast']:.2f}x and fp16 {speed['fp16 autocast + loss scaling']:.2f}x of fp32 "
    f"(timings on a shared machine: rerun `benchmarks/throughput_levers.py` on a quiet one). Whether 16 bits "
    f"is faster on a CPU depends on whether it has 16-bit matrix instructions (AVX-512 BF16, AMX) or only "
    f"converts; on a GPU's tensor cores the same code is where mixed precision's speed comes from."))

# %% [markdown]
# **Overflow.** fp16's largest value is 65504. Start the loss scale far too high (2^30): the scaled
# gradients overflow to inf, `GradScaler` finds the inf when it unscales, the loop skips that update
# (counted in `History.skipped`, no `FloatingPointError`: an overflow is expected) and the scale halves.
# After a run of clean steps (`growth_interval`, 5 here) it doubles again and probes upward.

# %%
ov = tp.overflow_run(init_scale=2.0 ** 30, steps=20, growth_interval=5)
tp.plot_scale(ov)
for s in ov["skipped"]:  # every overflow halves the scale the next step uses
    if s + 1 < len(ov["scale"]):
        assert ov["scale"][s + 1] == ov["scale"][s] / 2
first_clean = next(s for s in range(len(ov["scale"])) if s not in ov["skipped"])
assert ov["skipped"][:first_clean] == list(range(first_clean)) and all(map(math.isfinite, ov["loss"]))
display(Markdown(f"The first {first_clean} steps overflowed and were skipped, halving the scale from 2^30 to "
                 f"2^{math.log2(ov['scale'][first_clean]):.0f}, where the scaled gradients fit in fp16; "
                 f"{len(ov['skipped']) - first_clean} later probe(s) upward overflowed and were skipped too."))

# %% [markdown]
# **Sharded mixed precision.** ZeRO-3 keeps each rank's fp32 shard as the master weights; with
# `shard(model, comm, stage=3, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)` it gathers bf16
# copies for compute (half the all-gather bytes), and casts the bf16 gradients to fp32 before the
# reduce-scatter. PyTorch's FSDP2 does the same with `fully_shard(..., mp_policy=MixedPrecisionPolicy(
# param_dtype=torch.bfloat16, reduce_dtype=torch.float32))`. gloo on this torch runs all-reduce,
# all-gather and reduce-scatter on bf16 tensors; the gradients are reduced in fp32 anyway, as a 16-bit
# sum over N ranks rounds N-1 more times. Two gloo ranks, both strategies, and one process under
# `torch.autocast` on the full batch:

# %%
from course.parallel import launch, mp_experiments as mp
from course.parallel.experiments import Setup

mp_setup = Setup(steps=3, data="text", grad_clip=None)
sharded = launch.run(mp.compare, 2, mp_setup, timeout=300).values[0]
ref = mp.autocast_step(mp_setup)
z, f = sharded["zero3"], sharded["fsdp2"]
assert z["losses"] == f["losses"] and all(torch.equal(z["params"][n], f["params"][n]) for n in f["params"])
k, u = 8 * mp_setup.n_layer + 6, 2.0 ** -8  # 16-bit roundings only the pure-bf16 run makes; bf16 rounding unit
rel = math.sqrt(sum(float(((z["grads0"][n] - ref["grads0"][n]) ** 2).sum()) for n in ref["grads0"])
                / sum(float((g ** 2).sum()) for g in ref["grads0"].values()))
assert abs(z["loss0"] - ref["loss0"]) <= k * u * ref["loss0"] and rel <= 2 * k * u
display(Markdown(f"ZeRO-3 and FSDP2 agree bit for bit over {mp_setup.steps} steps (master weights "
                 f"{', '.join(z['master_dtype'])}). Against one process under autocast, the first loss differs by "
                 f"{abs(z['loss0'] - ref['loss0']) / ref['loss0']:.2%} and the gradient by {rel:.2%} (relative norm); "
                 f"the first-order bound from k = {k} extra bf16 roundings of at most 2^-8 is {k * u:.1%} and "
                 f"{2 * k * u:.1%} (derived in tests/test_mixed_precision.py)."))

# %% [markdown]
# ## 5. Throughput levers
#
# Tokens per second depend on more than the model. Each row below changes one thing against a baseline
# (batches cut from an in-memory tensor, B = 8, fp32), in this same process, round-robin, best step of
# each (load from other programs only ever adds time):
# - **data format**: the corpus tokenized once into a flat uint16 file opened with `numpy.memmap`
#   (`course.loader.MemmapData`; nanoGPT's train.bin) vs tokenizing raw text per batch;
# - **prefetch**: a background thread (`course.loader.Prefetcher`) prepares the next batches while the
#   model steps; shown with a simulated 20 ms storage latency per batch;
# - **batch size and accumulation**: 32 sequences per step in one batch or as 4 micro-batches of 8;
# - **precision**: bf16 and fp16 autocast.

# %%
# NBVAL_IGNORE_OUTPUT
times = tp.batch_times()
levers = tp.levers(steps=6, rounds=2)
display(Markdown(tp.levers_table(levers, times)))

# %%
by = {r["lever"]: r for r in levers}
slow = [k for k in by if k.startswith("slow storage")]
assert times["startup: open the memory-mapped file"] < times["startup: tokenize the corpus"]
display(Markdown(
    f"Opening the token file takes {times['startup: open the memory-mapped file'] * 1e3:.2f} ms against "
    f"{times['startup: tokenize the corpus'] * 1e3:.0f} ms to tokenize the corpus (the character tokenizer is "
    f"cheap; a BPE tokenizer costs far more per character). Under a {slow[0].split('(')[1].split(' per')[0]} "
    f"storage latency the prefetch thread gives {by[slow[1]]['tokens_per_s'] / by[slow[0]]['tokens_per_s']:.2f}x "
    f"the synchronous loader's tokens/s. On this CPU a larger batch is "
    f"{by['batch size 32']['vs_baseline']:.2f}x and accumulation {by['accumulation 4 x B=8 (32 per step)']['vs_baseline']:.2f}x "
    f"the baseline; on many GPUs accumulation's real gain is communication (one all-reduce per 4 micro-batches, "
    f"lesson 05). These timings come from a shared, loaded machine: rerun `benchmarks/throughput_levers.py`."))

# %% [markdown]
# **Bad data.** Web-scale corpora are filtered before training. GPT-3 (Brown et al. 2020, appendix A)
# filtered Common Crawl with a quality classifier and fuzzily deduplicated every dataset with MinHash LSH
# (10 hashes), removing about 10 %. Gopher's MassiveWeb (Rae et al. 2021, appendix A) drops documents by
# rules: 50 to 100,000 words, mean word length 3 to 10, at most 0.1 symbols (#, …) per word, at most 90 %
# bullet lines and 30 % lines ending in an ellipsis, 80 % of words with a letter, at least two of eight
# stop words. `course.quality.filter_documents` does exact deduplication, those rules, and near
# deduplication (MinHash over hashed 5-word shingles, confirmed by the exact Jaccard similarity ≥ 0.8).
# Here we pollute Python's documentation with 210 bad documents (30 copies and 30 near copies of one
# document, 120 symbol soups of 2,000 characters, 30 fragments) and train on it with and without the
# filter, three seeds, validating on held-out clean documents.

# %%
# NBVAL_IGNORE_OUTPUT
fr = tp.filter_runs(seeds=(0, 1, 2), steps=60)
display(Markdown("\n".join(["| removed because | documents |", "|---|---|"]
                           + [f"| {k} | {v} |" for k, v in fr["report"].items()])))
for name in ("polluted", "filtered"):
    print(f"{name:9s} val loss {statistics.mean(fr[name]):.3f} ± {statistics.stdev(fr[name]):.3f} (3 seeds)")

# %%
from course.quality import filter_documents

assert sum(fr["report"].values()) == fr["n_docs"][0] - fr["n_docs"][1]  # every removal has a reason
assert filter_documents(fr["kept"]) == (fr["kept"], {})  # what is left passes: no copies, no rule broken
display(Markdown(
    f"The filter kept {fr['n_docs'][1]} of {fr['n_docs'][0]} documents. Validation loss on clean text: "
    f"{statistics.mean(fr['polluted']):.3f} ± {statistics.stdev(fr['polluted']):.3f} trained on the polluted corpus, "
    f"{statistics.mean(fr['filtered']):.3f} ± {statistics.stdev(fr['filtered']):.3f} on the filtered one, the same "
    f"number of steps (mean ± sd over seeds: compare the gap with the spread before concluding). The filter also "
    f"dropped {fr['real_removed']} of the real documents (short ones, operator tables): a filter trades recall for precision, which is "
    f"why Gopher's thresholds were tuned by inspecting what they remove."))

# %% [markdown]
# **Augmentation and noise injection.** For images, a flip or a crop keeps the label; for text almost every
# edit changes the meaning, and GPT-3 saw most of its data less than once (Brown et al. 2020, Table 2.2: 0.44
# epochs of Common Crawl), so there is little overfitting to regularize: large language-model pretraining
# uses neither. On a small corpus trained for many epochs it can help, as dropout does;
# `course.loader.noisy_inputs(batch_fn, p, vocab_size)` replaces a fraction p of the input tokens by random
# ones (targets kept) for that experiment.

# %% [markdown]
# ## 6. Monitoring, and faults caught and handled
#
# A long run must watch itself. `Monitor` is a hook that records, after every step, the update/weight
# ratio ‖ΔW‖/‖W‖ (CS231n's rule of thumb puts it near 1e-3), the std of every block's output, and any
# metric you add with `monitor.add(name, fn)`, without editing the loop; with the loop's own History
# (loss, gradient norm, learning rate used, tokens/s, MFU where the peak is known) it draws a dashboard.
#
# `AnomalyGuard` checks each step before its update: a non-finite loss or gradient norm, or a loss
# spike, a z-score above 6 against the last 20 good losses (the reason for 6 is in
# `course/stability/anomalies.py`). Its policy skips the update and, for "rollback", restores the model,
# AdamW state and detector from the last in-memory snapshot and so skips the batches since, as PaLM
# did for its loss spikes (Chowdhery et al. 2022, §5.1). `FaultInjector` breaks a run on purpose (fault injection: a NaN, a corrupt batch, a learning-rate
# spike, a bit flip in a weight).
# Here: a NaN in an activation at step 20, and a corrupt batch (random tokens) at step 35.

# %%
steps = 60
model = setup.model(0)
mon = Monitor(model).add("embedding norm", lambda st: st.model.wte.weight.norm().item())  # a metric of your own
faults = FaultInjector(model, {20: "nan", 35: "corrupt_batch"})
guard = AnomalyGuard(model, policy="rollback", snapshot_every=10, monitor=mon)
hist = train(model, faults.wrap(setup.batch_fn(0)), setup.config(max_steps=steps, eval_interval=10, lr=best_lr),
                label="monitored", hooks=[faults, guard, mon])
mon.close()
faults.close()
mon.dashboard(hist, title="rollback policy")
plt.show()
for event in guard.events:
    print(event)

# %%
# NBVAL_CHECK_OUTPUT
assert [e[0] for e in guard.events] == [20, 35] and "non-finite" in guard.events[0][1] and "spike" in guard.events[1][1]
assert hist.skipped == [20, 35] and all(math.isfinite(v) for v in hist.val_loss)
print("both faults detected at the step they happened, rolled back, and training went on")

# %%
# NBVAL_IGNORE_OUTPUT
ratios = sorted(r for r in mon.metrics["update_ratio"] if math.isfinite(r))
Markdown(f"The red lines mark the two anomalies; at those steps no update was made, and the curves continue from "
         f"the restored snapshot. The median update/weight ratio is {ratios[len(ratios) // 2]:.1e}, above CS231n's "
         f"1e-3 (a heuristic for long runs): a toy model that must learn in {steps} steps at a peak rate of "
         f"{best_lr:g} moves its weights fast.")

# %% [markdown]
# Which policy for which fault? Skipping is enough for a transient fault (one bad batch, one NaN);
# a fault that has already reached the weights (a learning-rate spike applied in an update, a flipped
# bit in a weight) stays after a skip, and only a rollback to known-good weights removes it. Each
# fault at step 25 of a 50-step run, under each policy, three seeds; `clean` is the run without faults.

# %%
def fault_run(seed, kind, policy):
    model = setup.model(seed)
    inj = FaultInjector(model, {25: kind}, seed=seed)
    guard = AnomalyGuard(model, policy=policy, snapshot_every=10)
    hist = train(model, inj.wrap(setup.batch_fn(seed)), setup.config(lr=best_lr, seed=seed), hooks=[inj, guard])
    inj.close()
    return {"val": hist.final_val_loss if math.isfinite(hist.final_val_loss) else math.inf,
            "skipped": len(hist.skipped)}


fault_cfgs = {"clean": lambda seed: {**setup.run(seed, lr=best_lr), "skipped": 0}}
for kind in ("corrupt_batch", "nan", "lr_spike", "bit_flip"):
    for policy in ("skip", "lower_lr", "rollback"):
        fault_cfgs[f"{kind} / {policy}"] = lambda seed, k=kind, p=policy: fault_run(seed, k, p)
faults_cmp = compare(fault_cfgs, SEEDS, progress=True)
Markdown(ls.stats_table(faults_cmp, metrics=("val", "skipped")))

# %%
# NBVAL_IGNORE_OUTPUT
clean = faults_cmp["clean"]["val"]
worst_skip = max(("lr_spike", "bit_flip"), key=lambda k: faults_cmp[f"{k} / skip"]["val"].mean)
Markdown(f"Clean: {clean}. Every rollback ends within "
         f"{max(abs(faults_cmp[f'{k} / rollback']['val'].mean - clean.mean) for k in ('corrupt_batch', 'nan', 'lr_spike', 'bit_flip')):.3f} "
         f"of it. Skipping handles the corrupt batch and the NaN, but after a {worst_skip.replace('_', ' ')} it ends at "
         f"{faults_cmp[f'{worst_skip} / skip']['val'].mean:.3g} "
         f"({faults_cmp['bit_flip / skip']['skipped'].mean:.0f} steps skipped after the bit flip: every later loss "
         f"is non-finite, because the corrupted weight stays).")

# %%
# NBVAL_CHECK_OUTPUT
for kind in ("corrupt_batch", "nan", "lr_spike", "bit_flip"):
    assert all(math.isfinite(v) for v in faults_cmp[f"{kind} / rollback"]["val"].values), kind
assert faults_cmp["bit_flip / skip"]["skipped"].mean == 25  # steps 25..49: the flipped weight is never repaired
print("rollback recovers from all four faults; skip cannot repair a corrupted weight")

# %% [markdown]
# ## 7. Checkpoints, kills and resumes
#
# A run of weeks on thousands of devices will be interrupted: a node fails, a job is preempted, a process
# runs out of memory. What it loses is everything since its last checkpoint, and only if that checkpoint
# holds the **whole** training state. The weights alone are not enough. `course.checkpoint.save` writes:
#
# - the model's parameters and buffers, and AdamW's state (its step count and both moments);
# - the loop's position: the step to run next (the learning rate is a function of it) and the History so far;
# - every random number generator: torch's (dropout), CUDA's when present, Python's `random`, NumPy's;
# - the data position: the generator the batches are drawn from. Its state *is* the position in the stream.
#   CheckFreq (Mohan, Phanishayee and Chidambaram, FAST 2021) checkpoints its data loader's iterator for the
#   same reason, so that a resumed run sees each example exactly as often as the original.
#
# The file is written as an **atomic write**: a temporary file in the same directory, flushed and fsync'ed,
# then renamed over the final name with `os.replace`, then the directory fsync'ed. A process killed at any
# instant leaves at most a stale temporary file, never half a checkpoint under a real name. A **checksum**
# (SHA-256 of the payload, in the header) is verified on load, so a truncated or corrupted file is refused
# before anything is unpickled. `Checkpointer` is a hook of the one loop: it saves every few steps and keeps
# the last k, and `train(..., resume=ckpt.resume)` continues from the newest valid checkpoint.
#
# The experiment below trains a small GPT with dropout for 24 steps, checkpointing every 4. A subprocess is
# **SIGKILLed** three times: in the middle of step 5, halfway through writing the checkpoint of step 12, and
# after the checkpoint of step 16 is written but before its rename. Each time it is started again and resumes.
# The claim: its losses and final parameters equal the uninterrupted run's **bit for bit**. The same float
# operations then run in the same order, on one thread.

# %%
import tempfile
import warnings
from pathlib import Path

import torch
from IPython.display import Markdown, display

from course import checkpoint as ck
from course.lessons import fault_tolerance as ft
from course.train import train

spec = ft.Spec()
kills = ["step@5", "write@12", "rename@16"]
straight = ft.run_straight(spec)  # in this process, never interrupted
run_dir = Path(tempfile.mkdtemp(prefix="course-ckpt-"))
resumed = ft.run_with_kills(run_dir, spec, kills)  # a subprocess, started again after each SIGKILL
assert [a["returncode"] for a in resumed["attempts"]] == [-9, -9, -9, 0]  # -9: killed by SIGKILL
assert [a["resumed_from"] for a in resumed["attempts"]] == [None, 4, 8, 12]  # 12's write never got its name
assert ft.same_run(resumed, straight), "the resumed run differs from the uninterrupted one"
ft.plot_resume(straight, resumed, kills);

# %%
starts = ", ".join("a fresh start" if a["resumed_from"] is None else f"step {a['resumed_from']}"
                   for a in resumed["attempts"])
n_params = sum(p.numel() for p in straight["params"].values())
after_write = resumed["attempts"][2]["resumed_from"]
display(Markdown(
    f"{len(resumed['attempts'])} attempts started from {starts}. The kill during the write of step 12 left "
    f"only a temporary file, so the next attempt resumed from step {after_write} and trained steps "
    f"{after_write}-11 again. All "
    f"{len(straight['history'].train_loss)} training losses, the {len(straight['history'].val_loss)} validation "
    f"losses and all {n_params:,} parameters are identical to the uninterrupted run's (`==` and `torch.equal`)."))

# %% [markdown]
# **A damaged checkpoint.** Disks fill, copies are torn, bits flip. Below, the newest checkpoint left by that
# run (step 24) loses its last 100 bytes, and a resume in this process must refuse it, say why, and continue
# from the one before (step 20). Continuing 20 → 24 must give the uninterrupted run's final weights again.

# %%
newest = run_dir / ck.checkpoint_name(spec.steps)
newest.write_bytes(newest.read_bytes()[:-100])  # truncated
try:
    ck.read(newest)
except ck.CheckpointError as e:
    print("refused:", str(e).replace(str(run_dir) + "/", ""))

# %%
threads = torch.get_num_threads()
torch.set_num_threads(1)  # the same thread count as the uninterrupted run
model, batch_fn, gen, cfg = ft.build(ft.Spec(seed=3))  # other initial weights and data seed: all restored
ckpt = ck.Checkpointer(run_dir, every=spec.every, keep=spec.keep, data=gen)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    hist = train(model, batch_fn, cfg, hooks=[ckpt], resume=ckpt.resume)
torch.set_num_threads(threads)
print("skipped with a warning:", [Path(str(w.message).split()[2].rstrip(":")).name for w in seen])
print("resumed from:", ckpt.resumed_from.name)
assert ckpt.resumed_from.name == ck.checkpoint_name(spec.steps - spec.every)
assert all(torch.equal(v, straight["params"][k]) for k, v in model.state_dict().items())
assert hist.train_loss == straight["history"].train_loss

# %% [markdown]
# **A rank dies.** In a data-parallel job, one dead process stops the whole group: the others wait for it in
# their next collective until gloo or NCCL reports a broken connection. `torchrun --max-restarts=1` (PyTorch's
# elastic launcher; docs "torchrun (Elastic Launch)") then stops every rank of the group and starts them all
# again: an **elastic restart**. The restarted ranks resume from the newest step that *every* rank holds intact.
# Each rank saves its own file here, because each rank draws its own batches and so has its own data position.
# Below, 2 ranks train with torch's DDP; rank 1 SIGKILLs itself in the middle of step 7, once (a marker file
# keeps it from dying again). The same job, run by nobody's hand, is the reference.

# %%
rk = ft.rank_kill(Path(tempfile.mkdtemp(prefix="course-rank-kill-")))
assert rk["killed"]["restart"] == 1 and rk["equal"], "recovery after the rank's death changed the run"
import matplotlib.pyplot as plt

ax = plt.subplots(figsize=(6, 3))[1]
ax.plot(rk["straight"]["train_loss"], lw=2, label="nobody killed")
ax.plot(rk["killed"]["train_loss"], "o", ms=4, label="rank 1 killed at step 7, torchrun restart")
ax.axvline(rk["job"].kill_step, ls="--", color="gray")
ax.set_xlabel("optimizer step"), ax.set_ylabel("training loss, rank 0 (nats / token)"), ax.legend();

# %%
display(Markdown(
    f"torchrun restarted the group once (TORCHELASTIC_RESTART_COUNT = {rk['killed']['restart']}). The new "
    f"attempt resumed from step {rk['killed']['resumed_at']}, the last checkpoint both ranks held, and redid "
    f"the steps after it. Its {len(rk['killed']['train_loss'])} losses and final parameters equal those of the "
    f"run nobody killed, bit for bit."))

# %% [markdown]
# **Distributed and asynchronous checkpoints.** A sharded model (ZeRO-3, FSDP2) has no whole copy anywhere,
# and gathering one to rank 0 would cost memory and time. With PyTorch's **distributed checkpoint (DCP)**,
# `torch.distributed.checkpoint`, every rank writes its own shard, and the coordinator writes a metadata file
# that says where each chunk of each tensor is. Any number of ranks can read that back, each fetching the rows
# its new shard needs: **resharding**. `tests/test_distributed_checkpoint.py` saves an FSDP2 model with its
# AdamW state on 4 ranks and loads it on 2, with every tensor equal. A save still blocks training while it
# writes. **Asynchronous checkpointing** (CheckFreq's snapshot/persist split; `dcp.async_save`)
# blocks only while the state is copied into CPU memory, and the write runs in a background thread.
# `course.parallel.dcp.AsyncSaver` is that, written out. Below, the time a training step waits for each kind
# of save, 2 ranks, medians of 3.

# %%
# NBVAL_IGNORE_OUTPUT
times = ft.save_times(Path(tempfile.mkdtemp(prefix="course-dcp-")))
ft.plot_save_times(times);

# %%
# NBVAL_IGNORE_OUTPUT
display(Markdown(
    f"A synchronous save blocked training for {1e3 * times['sync_blocked_s']:.0f} ms. The asynchronous ones "
    f"blocked it for {1e3 * times['ours_blocked_s']:.0f} ms (AsyncSaver) and "
    f"{1e3 * times['torch_blocked_s']:.0f} ms (`dcp.async_save`), "
    f"{times['sync_blocked_s'] / times['ours_blocked_s']:.1f}x and "
    f"{times['sync_blocked_s'] / times['torch_blocked_s']:.1f}x less. On this CPU the background write also "
    f"competes with training for the same cores: one training step run while AsyncSaver wrote took "
    f"{1e3 * times['step_s']:.0f} ms."))

# %% [markdown]
# ## 8. Overfitting, and what counters it
#
# With too little data a model memorises it: the training loss keeps falling while the validation
# loss turns up. We train on the first 2,048 characters of the corpus only, for 200 steps, without
# any regularization, with dropout 0.2 and GPT-3's weight decay 0.1 (Brown et al. 2020, appendix B),
# and with gradient noise added as well (Neelakantan et al. 2015: N(0, η/(1+t)^0.55) on every gradient).

# %%
small = ls.tiny_data(2048)
over_steps = 200
over = {"none": dict(dropout=0.0, weight_decay=0.0), "dropout 0.2 + wd 0.1": dict(dropout=0.2, weight_decay=0.1)}
curves, over_cmp = {}, {}
for name, kw in over.items():
    curves[name] = []

    def one(seed, kw=kw, name=name):
        out, h = setup.run(seed, data=small, lr=best_lr, max_steps=over_steps, eval_interval=25, history=True, **kw)
        curves[name].append(h)
        return {**out, "best val": min(h.val_loss)}
    over_cmp[name] = compare({name: one}, SEEDS)[name]

# %%
curves["+ gradient noise"] = []


def noisy(seed):
    out, h = setup.run(seed, data=small, lr=best_lr, max_steps=over_steps, eval_interval=25, history=True,
                       dropout=0.2, weight_decay=0.1, hooks=[GradientNoise(eta=0.01, seed=seed)])
    curves["+ gradient noise"].append(h)
    return {**out, "best val": min(h.val_loss)}


over_cmp["dropout 0.2 + wd 0.1 + gradient noise"] = compare({"n": noisy}, SEEDS)["n"]
ls.plot_curves(curves)
plt.title(f"training on {len(small.train):,} characters: mean over 3 seeds ± std")
plt.show()
Markdown(ls.stats_table(over_cmp, metrics=("train", "val", "best val")))

# %%
# NBVAL_IGNORE_OUTPUT
none, reg = over_cmp["none"], over_cmp["dropout 0.2 + wd 0.1"]
noise = over_cmp["dropout 0.2 + wd 0.1 + gradient noise"]
Markdown(f"Without regularization the final training loss is {none['train'].mean:.3f} and the validation loss "
         f"{none['val'].mean:.3f}, {none['val'].mean - none['best val'].mean:.3f} above its best: the model has "
         f"memorised the {len(small.train):,} characters. With dropout and weight decay the gap between train "
         f"and validation is {reg['val'].mean - reg['train'].mean:.3f} instead of {none['val'].mean - none['train'].mean:.3f}, "
         f"and the final validation loss {reg['val'].mean:.3f} ± {reg['val'].half_width:.3f} against "
         f"{none['val'].mean:.3f} ± {none['val'].half_width:.3f} "
         f"({'separated' if separated(reg['val'], none['val']) else 'overlapping'} 95% intervals). Gradient noise "
         f"at η = 0.01 on top ends at {noise['val'].mean:.3f} ± {noise['val'].half_width:.3f}, "
         f"{'worse' if noise['val'].mean > reg['val'].mean else 'better'} than without it: at this size and step "
         f"count it {'slows fitting more than it regularizes' if noise['val'].mean > reg['val'].mean else 'helps'}; "
         f"each remedy has to be measured.")

# %% [markdown]
# ## Summary
#
# - The learning rate decides convergence; a range test (one run) brackets what a sweep finds;
#   schedules are one config field (cosine, linear, WSD), checked against their formulas.
# - Initialization sets how signals and gradients scale with depth; GPT-2's 1/√(2L) keeps the
#   residual stream flat, N(0, 1) breaks training before it starts.
# - Accumulation equals a large batch at the memory of a small one; at equal tokens, more smaller
#   steps can win below the critical batch size.
# - 16-bit compute keeps fp32 master weights; fp16 needs loss scaling, bf16 does not; sharded runs
#   gather 16-bit copies and reduce in fp32. Throughput comes from the data path as much as the math.
# - Monitoring is hooks on the one loop; anomalies are detected before the update; skip fixes transient
#   faults, rollback also repairs corrupted weights.
# - A checkpoint is the whole state (weights, optimizer, RNGs, data position), written atomically and
#   checksummed; then a killed run resumes bit for bit, and a dead rank costs only the steps since.
# - Too little data overfits; regularization narrows the gap between training and validation loss.
# Every comparison above is over three seeds: read the intervals, not single numbers.
