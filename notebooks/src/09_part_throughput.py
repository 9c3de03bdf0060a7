# %% [markdown]
# ## N. Mixed precision
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

setup = Setup(steps=3, data="text", grad_clip=None)
sharded = launch.run(mp.compare, 2, setup, timeout=300).values[0]
ref = mp.autocast_step(setup)
z, f = sharded["zero3"], sharded["fsdp2"]
assert z["losses"] == f["losses"] and all(torch.equal(z["params"][n], f["params"][n]) for n in f["params"])
k, u = 8 * setup.n_layer + 6, 2.0 ** -8  # 16-bit roundings only the pure-bf16 run makes; bf16 rounding unit
rel = math.sqrt(sum(float(((z["grads0"][n] - ref["grads0"][n]) ** 2).sum()) for n in ref["grads0"])
                / sum(float((g ** 2).sum()) for g in ref["grads0"].values()))
assert abs(z["loss0"] - ref["loss0"]) <= k * u * ref["loss0"] and rel <= 2 * k * u
display(Markdown(f"ZeRO-3 and FSDP2 agree bit for bit over {setup.steps} steps (master weights "
                 f"{', '.join(z['master_dtype'])}). Against one process under autocast, the first loss differs by "
                 f"{abs(z['loss0'] - ref['loss0']) / ref['loss0']:.2%} and the gradient by {rel:.2%} (relative norm); "
                 f"the first-order bound from k = {k} extra bf16 roundings of at most 2^-8 is {k * u:.1%} and "
                 f"{2 * k * u:.1%} (derived in tests/test_mixed_precision.py)."))

# %% [markdown]
# ## N. Throughput levers
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
