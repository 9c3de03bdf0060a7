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
# 4. a monitored run with a NaN and a loss spike injected, caught and handled, on a dashboard;
# 5. overfitting a tiny training set, and what dropout, weight decay and gradient noise do to it.
#
# Two more sections of this chapter, spliced in where they belong, measure the other half of the
# story: throughput (data loading, prefetch, batch, accumulation, mixed precision with loss scaling)
# and fault tolerance (checkpoint and resume, bit for bit, and a rank that dies).
#
# The library: `course/train.py` (schedules, hooks), `course/stability/` (seeds, init, monitor,
# anomalies, hyperparameter tools), `course/lessons/stability.py` (this lesson's experiments and figures).

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
# rate and decays only in a final cooldown (Hu et al. 2024, MiniCPM §4; Hägele et al. 2024 §3, who
# find a cooldown of about 20% of training matches cosine, the default `decay_fraction` here). Its
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
# <!-- throughput section -->

# %% [markdown]
# ## 4. Monitoring, and faults caught and handled
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
# <!-- fault-tolerance section -->

# %% [markdown]
# ## 5. Overfitting, and what counters it
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
# - Monitoring is hooks on the one loop; anomalies are detected before the update; skip fixes transient
#   faults, rollback also repairs corrupted weights.
# - Too little data overfits; regularization narrows the gap between training and validation loss.
# Every comparison above is over three seeds: read the intervals, not single numbers.
