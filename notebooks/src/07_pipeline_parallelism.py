# %% [markdown]
# # 07 · Pipeline parallelism: schedules as data, run, simulated and drawn
#
# A model too big for one GPU can be cut **across its layers**: rank 0 holds the first layers, rank 1
# the next ones, and so on. Each rank is a **stage**; activations flow forward from stage to stage and
# their gradients flow back. Done naively, only one stage works at a time. Cutting the batch into
# **micro-batches** lets stages work on different micro-batches at once, and the order in which each
# rank runs its forwards and backwards, the **schedule**, decides how much time is lost waiting (the
# **bubble**) and how many micro-batches' activations each stage must keep.
#
# Here a schedule is a small piece of data: for every rank, the list of its actions ("1F3": stage 1,
# forward, micro-batch 3; "1B3" backward; "1SEND_F3" ...). The same list is
# 1. **validated** (every forward before its backward, every receive with its send, no deadlock),
# 2. **executed** for real on gloo ranks by `course.parallel.pipeline.run_schedule` (loss and every
#    gradient equal to the unsplit model's), recording each rank's timeline,
# 3. **simulated** from per-action costs by `course.parallel.schedules.simulate`, and
# 4. **drawn** as a Gantt chart, measured and simulated side by side.
#
# We build GPipe (Huang et al. 2019); 1F1B, whose one-forward-one-backward order comes from PipeDream
# (Narayanan et al. 2019) and whose flushed, synchronous form is PipeDream-Flush (Narayanan et al. 2021,
# "Memory-Efficient Pipeline-Parallel DNN Training"), the schedule Megatron-LM uses (Narayanan et al. 2021,
# "Efficient Large-Scale Language Model Training on GPU Clusters", §2.2.1); interleaved 1F1B (the same
# Megatron-LM paper, §2.2.2); and ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism"), and put
# PyTorch's own `torch.distributed.pipelining` beside them. From a shell the same experiments start
# with `torchrun --standalone --nproc-per-node=2 -m course.parallel.pp_experiments`.

# %%
import os

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from course.costs import LINKS, link_seconds, megatron_bubble_ratio, zb_h1_bubble_time
from course.device import profile
from course.lessons import pipeline as L
from course.parallel.pipeline import Stage
from course.parallel.pp_experiments import Setup
from course.parallel.schedules import Action, Schedule, make, simulate, validate

prof = profile("cpu")  # the ranks are gloo processes on the CPU, whatever the machine has
P = 4  # pipeline stages = ranks
EXACT = Setup()  # 8 layers, 16 wide, float64: equality checks
TIMING = Setup(dtype="float32", layer_seconds=0.01)  # the same tiny model; each action padded to a fixed time
NAIVE = Setup(n_head=prof.n_head, n_embd=prof.n_embd, seq_len=prof.block_size // 2, dtype="float32")
print(prof, "\n", TIMING, "\n", NAIVE, sep="")

# %% [markdown]
# ## 1. A model cut into stages
#
# `Stage(model, s, S)` copies layers s·L/S … (s+1)·L/S − 1 of the shared `Transformer` (which is not
# changed); stage 0 also gets the token and position embeddings, the last stage the final LayerNorm
# and the head. GPT-2 ties the head's weight to the token embedding; those now live on different
# ranks, so each keeps a copy and their two gradients are summed before every optimizer step, as
# Megatron-LM does (`_allreduce_word_embedding_grads` in `megatron/core/distributed/finalize_model_grads.py`).
# Running the stages one after another is the model:

# %%
model = EXACT.model()
stages = [Stage(model, s, P) for s in range(P)]
x, y = EXACT.batch()
h = x
for st in stages:
    h = st(h)
assert torch.equal(h, model(x)[0])  # the same operations in the same order: bit for bit
for st in stages:
    extra = ["embeddings"] * st.is_first + ["LayerNorm + head"] * st.is_last
    print(f"stage {st.index}: blocks {st.first_layer}-{st.first_layer + len(st.blocks) - 1}",
          f"{sum(q.numel() for q in st.parameters()):>6,} parameters", ", ".join(extra))

# %% [markdown]
# Layers that do not divide evenly are refused rather than split unevenly (the schedules below assume
# equal stages):

# %%
try:
    Stage(model, 0, 3)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 2. A schedule is a list per rank
#
# 1F1B with p = 4 ranks and m = 8 micro-batches. Rank r first runs p − 1 − r forwards (**warm-up**),
# then alternates one forward and one backward (**steady state**), then drains the remaining
# backwards (**cool-down**); the code of `one_f_one_b` names the three phases. Sends and receives are
# added next to the actions that need them:

# %%
s = make("1f1b", P, 8)
print(s)
print("rank 1 with its messages:", " ".join(map(str, s.ranks[1][:9])), "...")
print("peak live micro-batches per rank (validate):", validate(s))

# %% [markdown]
# The validator checks a hand-written list too, and names the first rule it breaks and the action.
# Here rank 0 waits for the gradient of micro-batch 0 *before* sending that micro-batch forward:

# %%
bad = Schedule("hand-written", 2, 1, 1, [[Action.parse(a) for a in "0F0 0RECV_B0 0SEND_F0 0B0".split()],
                                         [Action.parse(a) for a in "1RECV_F0 1F0 1B0 1SEND_B0".split()]])
try:
    validate(bad)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ## 3. One launch: every run of this lesson
#
# One launch of 4 gloo ranks (one thread each) runs: the naive pipeline with real compute; every
# schedule at m = 1, 2, 4, 8 with **equal stage costs**; a short training through `course.train.train`;
# and PyTorch's schedules. Equal stage costs on a CPU: every stage has the same number of identical
# blocks and every action is padded to a fixed length, 10 ms per layer for a forward (and for each half
# I, W of a split backward), twice that for a full backward, by sleeping after its real compute (a
# tiny model, far shorter). A sleeping rank does not use a core, so four ranks on two cores still show
# the schedule and not the CPU's contention; the actions whose compute ran past the pad are counted.
# Of two runs of each case, the one with the shorter step is kept.

# %%
# NBVAL_IGNORE_OUTPUT
CASES = [(n, m, 1) for n in ("gpipe", "1f1b", "zb-h1") for m in (1, 2, 4, 8)] + [("interleaved", m, 2) for m in (4, 8)]
TORCH = [("gpipe", 8, 1), ("1f1b", 8, 1), ("interleaved", 8, 2), ("zb-h1", 8, 1), ("csv:zb-h1", 8, 1)]
run = L.run_lesson(TIMING, CASES, NAIVE, TORCH, ("1f1b", 4, 1, 2), p=P)
sim = L.simulate_cases(TIMING, CASES, run["link_s"], p=P)
print(f"link (one activation, one way): {run['link_s'] * 1e3:.2f} ms;",
      f"padded actions that ran longer: {sum(c['overruns'] for c in run['cases'].values())}")

# %% [markdown]
# ## 4. The naive pipeline idles
#
# With one micro-batch (GPipe with m = 1), stage r waits for the forward of stages 0 … r − 1 and later
# for the backward of stages r + 1 … p − 1. Here with real compute (the profile's width, no padding):

# %%
naive = run["naive"]
fig, ax = plt.subplots(figsize=(9, 2.2))
L.plot_gantt(naive, ax, f"naive pipeline, real compute: idle share {naive.bubble:.0%}", scale=1e3,
             unit="time since the step started (ms)")
L.legend(fig, ("F", "B"), chunks=False)
fig.tight_layout(rect=(0, 0.12, 1, 1))

# %%
# NBVAL_IGNORE_OUTPUT
display(Markdown(f"Each of the {P} ranks computed {sum(naive.busy) / P * 1e3:.0f} ms of a {naive.makespan * 1e3:.0f} ms "
                 f"step: idle {naive.bubble:.0%} of the time, against (p − 1)/p = {(P - 1) / P:.0%} if the stages "
                 f"were equal and messages free (the first stage also embeds, the last also runs the head)."))

# %%
# NBVAL_CHECK_OUTPUT
assert naive.bubble > 0.5  # most of every rank's time is waiting
print("naive pipeline: every rank idles more than half of the step")

# %% [markdown]
# ## 5. Four schedules, measured and simulated
#
# p = 4, m = 8. Left: measured on the gloo ranks; right: `simulate` with the same action times and the
# measured link time. Boxes are labelled with their micro-batch; hatched boxes are the second model
# chunk of interleaving (each rank holds stages r and r + 4 of 8, each chunk half a stage). Each title
# shows the **idle share** of the step, 1 − busy / (p · makespan), which is GPipe's (p − 1)/(m + p − 1),
# and the **bubble over the ideal time**, makespan / busy − 1, which is Megatron's (p − 1)/m and (p − 1)/(v·m).

# %%
fig, axes = plt.subplots(4, 2, figsize=(13, 9), sharex="row")
for row, key in zip(axes, [("gpipe", 8, 1), ("1f1b", 8, 1), ("interleaved", 8, 2), ("zb-h1", 8, 1)]):
    measured = run["cases"][key]["timeline"]
    L.plot_gantt(measured, row[0], "measured · " + L.caption(measured, key[0], P, 8, key[2]), scale=1e3,
                 unit="time since the step started (ms)")
    L.plot_gantt(sim[key], row[1], "simulated · " + L.caption(sim[key], key[0], P, 8, key[2]), scale=1e3,
                 unit="time since the step started (ms)")
L.legend(fig)
fig.tight_layout(rect=(0, 0.04, 1, 1))

# %% [markdown]
# What the charts show:
# - **GPipe** runs all eight forwards, then all eight backwards: the triangles of idle time at the start
#   and end are the bubble, (p − 1) forward + backward times on every rank.
# - **1F1B** has the same bubble (the same triangles, rearranged) but starts backwards early: rank r
#   never holds more than p − r micro-batches (section 6).
# - **Interleaved 1F1B** gives each rank two chunks of half the layers; a micro-batch passes each rank
#   twice, so the ramp-up and ramp-down triangles are made of half-length boxes: half the bubble, for
#   twice the messages.
# - **ZB-H1** splits each backward into I (gradient with respect to the stage's input, which the
#   previous stage waits for) and W (gradients of the weights, which nobody waits for). Rank r runs its
#   W passes r micro-batches late, so they fill the cool-down: idle time per rank
#   (p − 1)(F + I − W) instead of (p − 1)(F + I + W), for m ≥ p (Qi et al. 2023, §2.1, Figure 3 and Table 2; with
#   F = I = W a third of 1F1B's).

# %% [markdown]
# ## 6. Bubble against the number of micro-batches
#
# The plot shows the **idle share** (GPipe's normalization) for every measured case, the simulated one
# as crosses, and GPipe's formula (p − 1)/(m + p − 1) as a line (it holds for GPipe and 1F1B only); the
# table gives both normalizations, each beside the formula of *that* schedule,
# and a third timeline: the simulator **replaying** the run, given every action's measured duration and
# the measured link. A replay can only be earlier than the run (each measured action already waited for
# its predecessor and its message), and the difference is time lost between actions on this machine.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
L.plot_bubbles(run["cases"], sim, P, ax)
ax.set_title(f"p = {P}: idle share of one step, measured on gloo ranks vs simulated");

# %%
# NBVAL_IGNORE_OUTPUT
replays = {k: L.replay(c["timeline"], make(k[0], P, k[1], k[2]), run["link_s"]) for k, c in run["cases"].items()}
rows = ["| schedule | m | idle share: measured | replay | simulated | formula | bubble/ideal: measured | "
        "simulated | formula |", "|---|---|---|---|---|---|---|---|---|"]
for (name, m, v), c in run["cases"].items():
    tl, sm, r = c["timeline"], sim[(name, m, v)], L.formula_ratio(name, P, m, v)
    share = "—" if r is None else f"{r / (1 + r):.3f}"  # idle / (busy + idle) from idle / busy
    rows.append(f"| {L.TITLES[name]}{' v=2' if v > 1 else ''} | {m} | {tl.bubble:.3f} | {replays[(name, m, v)].bubble:.3f} | "
                f"{sm.bubble:.3f} | {share} | {tl.bubble_ratio:.3f} | {sm.bubble_ratio:.3f} | "
                f"{'—' if r is None else f'{r:.3f}'} |")
display(Markdown("\n".join(rows)))

# %%
# NBVAL_IGNORE_OUTPUT
load = os.getloadavg()[0]
gap, worst = max((c["timeline"].bubble - sim[k].bubble, k) for k, c in run["cases"].items())
display(Markdown(f"Formulas: (p−1)/m for GPipe and 1F1B, (p−1)/(vm) interleaved (Narayanan et al. "
                 f"2021, §2.2), (p−1)(F+I−W)/(m(F+I+W)) for ZB-H1 with m ≥ p (Qi et al. 2023, §2.1 and §2.3 "
                 f"Table 2; — where m < p); "
                 f"idle share = ratio/(1 + ratio). The measured idle share exceeds the simulated one by at most "
                 f"{gap:.3f} ({L.TITLES[worst[0]]}, m = {worst[1]}). Load average while this ran: {load:.1f} on "
                 f"{os.cpu_count()} cores."))

# %% [markdown]
# In the simulated columns every schedule follows its own formula: interleaving halves Megatron's ratio,
# and ZB-H1's idle time is a third of 1F1B's with F = I = W once m ≥ p (below that there are not enough
# deferred W passes to fill the cool-down). The measured columns sit above the simulated ones by the gap
# printed under the table: every wake-up of a rank comes late, more so when other processes keep the two
# cores busy; the replay column shows how much of that is in the actions themselves, and the rest is lost
# between actions. `benchmarks/pipeline.py` holds the ±10%
# comparison of measured, simulated and formula at p = 2 and 4.

# %%
# NBVAL_CHECK_OUTPUT
b = {key: c["timeline"].bubble for key, c in run["cases"].items()}
assert all(b[(n, 1, 1)] > b[(n, 8, 1)] for n in ("gpipe", "1f1b"))  # more micro-batches, less bubble
assert all(replays[k].makespan <= c["timeline"].makespan + 1e-9 for k, c in run["cases"].items())
for name, v, cost in (("gpipe", 1, L.unit_costs()), ("1f1b", 1, L.unit_costs()), ("interleaved", 2, L.unit_costs(2))):
    assert abs(simulate(make(name, P, 8, v), cost).bubble_ratio - megatron_bubble_ratio(P, 8, v)) < 1e-12
one = simulate(make("zb-h1", P, 8), L.unit_costs())
assert one.makespan - max(one.busy) == zb_h1_bubble_time(P, 1.0, 1.0, 1.0)
print("measured: GPipe and 1F1B idle less with more micro-batches; every replay fits inside its run;\n"
      "simulated: (p-1)/m for GPipe and 1F1B, (p-1)/(vm) interleaved, ZB-H1 idle time (p-1)(F+I-W)")

# %% [markdown]
# ## 7. Peak activation memory per stage, measured
#
# Every tensor that autograd saves for backward is followed (saved-tensor hooks) until its memory is
# freed, labelled by stage and micro-batch: the peak of the bytes held, and of the number of
# micro-batches with something held. GPipe keeps all m; 1F1B at most p − r on rank r; ZB-H1 at most p
# (Qi et al. 2023: the same peak as 1F1B's first rank); interleaving's rank 0 holds
# (v − 1)·p + 2(p − 1) + 1 chunks of half a stage, p + (p − 1)/v micro-batches' worth (Korthikanti et al.
# 2022, section 4.2.3).

# %%
mem_cases = {k: run["cases"][k] for k in [("gpipe", 8, 1), ("1f1b", 8, 1), ("interleaved", 8, 2), ("zb-h1", 8, 1)]}
fig, ax = plt.subplots(figsize=(8, 3.5))
L.plot_memory(mem_cases, ax)
ax.set_title(f"p = {P}, m = 8: bytes autograd holds at the peak, per rank");

# %%
# NBVAL_CHECK_OUTPUT
for key, c in mem_cases.items():
    print(f"{L.TITLES[key[0]]:17s} peak live chunks per rank {c['peak_live']}")
    assert c["peak_live"] == validate(make(key[0], P, key[1], key[2]))  # measured = what the schedule predicts
assert mem_cases[("gpipe", 8, 1)]["peak_live"] == [8] * P
assert mem_cases[("1f1b", 8, 1)]["peak_live"] == [P - r for r in range(P)]
assert max(mem_cases[("zb-h1", 8, 1)]["peak_live"]) <= P and mem_cases[("interleaved", 8, 2)]["peak_live"][0] == 2 * P + P - 1

# %%
# NBVAL_IGNORE_OUTPUT
g, o = (mem_cases[(n, 8, 1)]["peak_bytes"][0] for n in ("gpipe", "1f1b"))
display(Markdown(f"Rank 0 holds {g / 2**10:.0f} KiB at GPipe's peak and {o / 2**10:.0f} KiB at 1F1B's: "
                 f"{o / g:.2f}×, the p/m = {P / 8:.2f} the counts predict. The same bubble for a fraction of the "
                 f"memory is why 1F1B replaced GPipe (Narayanan et al. 2021, section 2.2.1)."))

# %% [markdown]
# ## 8. Explore the schedules
#
# Choose p, m, v and the schedule; the simulated Gantt chart (B = 2F, I = W = F), the bubble and the peak
# memory per rank. The logic is `course.lessons.pipeline.explore`, a plain function (tested); the cell
# after the widget draws one setting, so the figure is there without a running kernel.

# %%
# NBVAL_IGNORE_OUTPUT
L.explorer()

# %%
r = L.explore(p=4, m=8, v=2, schedule="interleaved")
L.draw_explore(r);
print(f"interleaved p=4 m=8 v=2: bubble/ideal {r['ratio']:.3f} = (p-1)/(vm) {r['megatron_formula']:.3f}; "
      f"peak per rank {r['peak_microbatches']} micro-batches")

# %% [markdown]
# ## 9. PyTorch's own, on the same stages
#
# `torch.distributed.pipelining` (`ScheduleGPipe`, `Schedule1F1B`, `ScheduleInterleaved1F1B`,
# `ScheduleInterleavedZeroBubble`) ran the same `Stage` modules in the launch above, in a thread with a
# timeout (pipelining on gloo has hung before). Our ZB-H1 was also exported as PyTorch's CSV schedule
# format (`Schedule.to_csv`) and executed by PyTorch's runtime (`csv:zb-h1`).

# %%
# NBVAL_IGNORE_OUTPUT
torch_runs = run["torch"]
if all(t["available"] for t in torch_runs):
    for i, c in enumerate(torch_runs[0]["cases"]):
        worst = max(t["cases"][i]["grad_rel_diff"] for t in torch_runs)
        same = c["order"] == c["ours"] if c["order"] else "n/a"
        print(f"{c['schedule']:12s} largest relative gradient difference {worst:.1e}; rank 0 runs our order: {same}")
else:
    print(next(t["reason"] for t in torch_runs if not t["available"]))

# %%
# NBVAL_CHECK_OUTPUT
if all(t["available"] for t in torch_runs):
    assert all(c["grad_rel_diff"] < 1e-12 for t in torch_runs for c in t["cases"])  # float64, as in the tests
print("PyTorch's pipelining: the same gradients as the unsplit model (float64), or not available here")

# %% [markdown]
# And the pipeline trains through the course's one loop: `PipelineModel` is this rank's stages behind
# the interface `course.train.train` expects. Its forward runs a whole schedule (every forward and
# backward) and returns the loss, which every rank gets; `loss.backward()` then hands over the
# gradients the schedule made; the gradient norm for clipping sums squares over the stages.

# %%
# NBVAL_CHECK_OUTPUT
t = run["train"][0]
assert all(abs(a - b) < 1e-10 for a, b in zip(t["loss"] + t["grad_norm"], t["ref_loss"] + t["ref_norm"]))
assert max(r["param_diff"] for r in run["train"]) < 1e-10  # float64: a few ulps after 2 AdamW steps
print(f"{len(t['loss'])} AdamW steps, 1F1B on 4 ranks vs the unsplit model: the same losses, gradient norms "
      f"and parameters (float64, within 1e-10)")

# %% [markdown]
# ## 10. What a pipeline sends, and why it goes across nodes
#
# A pipeline stage sends one tensor of b·s·h elements (a micro-batch's activations at the cut) to the
# next stage and receives one of the same size back (Narayanan et al. 2021, section 3.2). Tensor
# parallelism (chapter 06) instead all-reduces b·s·h elements twice in the forward and twice in the
# backward pass of **every layer** (Shoeybi et al. 2019, section 3). Counted by `Comm` in the runs above:

# %%
# NBVAL_CHECK_OUTPUT
c = run["cases"][("1f1b", 8, 1)]
hop = TIMING.batch_size // 8 * TIMING.seq_len * TIMING.n_embd * 4  # bytes, fp32
sends = [sum(a.kind.startswith("SEND") for a in make("1f1b", P, 8).ranks[r]) for r in range(P)]
assert c["sent_bytes"] == [n * hop for n in sends]
print(f"1F1B p={P} m=8: bytes sent per rank {c['sent_bytes']} = sends {sends} x b·s·h·4 = {hop} bytes")

# %%
# NBVAL_IGNORE_OUTPUT
gpt3 = L.comm_per_step(b=1, s=2048, h=12288, n_layer=96, ranks=8, m=1)  # GPT-3 175B sizes, 16-bit
hdr = "InfiniBand HDR (DGX A100, between nodes)"
display(Markdown(
    f"At GPT-3's sizes (s = 2048, h = 12288, 96 layers, 16-bit, one sequence per micro-batch) a hop is "
    f"{gpt3['hop_bytes'] / 1e6:.0f} MB. Split over 8 ranks as a pipeline, a rank sends "
    f"{gpt3['pipeline_bytes'] / 1e6:.0f} MB per micro-batch; as 8-way tensor parallelism, "
    f"{gpt3['tensor_bytes'] / 1e9:.1f} GB, {gpt3['tensor_bytes'] / gpt3['pipeline_bytes']:.0f}× more, and inside "
    f"every layer where it cannot wait. That is why Megatron-LM keeps tensor parallelism inside a server "
    f"(NVLink) and lets pipeline parallelism cross servers (InfiniBand), with data parallelism outside both "
    f"(Narayanan et al. 2021, section 3.2, takeaway 1). One hop takes "
    f"{link_seconds(gpt3['hop_bytes'], hdr) * 1e3:.1f} ms on one {LINKS[hdr] * 8 / 1e9:.0f} Gb/s HDR InfiniBand "
    f"link, one per GPU in a DGX A100. The price of the pipeline is the bubble, which needs m ≫ p micro-batches "
    f"per step, or interleaving (v times the messages) or zero-bubble schedules to shrink: ZB-H1 keeps 1F1B's "
    f"peak (Qi et al. 2023, Table 2: p·M_B), which here every rank reaches (section 7); ZB-H2 removes the bubble "
    f"for up to 2p − 1 micro-batches in flight (Qi et al. 2023, §2.2)."))

# %% [markdown]
# ## What this CPU cannot show
#
# - **Real stage times.** Four ranks share two cores here, so compute slows down whenever two ranks
#   compute at once; that is why the schedule comparison pads every action to a fixed time. On GPUs
#   each stage has its own device and the measured bubble follows the same formulas with real kernels.
# - **Links.** gloo moves activations through this machine's memory (the link time printed in section 3);
#   between servers a GPT-3 hop takes milliseconds (section 10), which the simulator's `link` cost models
#   (try it in `explore(link=...)`).
# - **Memory pressure.** The activation bytes are measured exactly, but nothing here runs out of memory.
#
# Recorded GPU runs of `benchmarks/pipeline.py`, if any:

# %%
from course.reference import describe

print(describe("pipeline"))

# %% [markdown]
# ## Summary
#
# - A schedule is data: per-rank action lists, validated, executed on gloo ranks with the unsplit
#   model's loss and gradients, simulated and drawn with one renderer.
# - GPipe and 1F1B idle (p − 1)/(m + p − 1) of the step; 1F1B holds p − r micro-batches instead of m.
# - Interleaving v chunks divides the bubble by v for v times the messages; ZB-H1 fills the cool-down
#   with deferred weight gradients at 1F1B's peak memory.
# - A pipeline sends b·s·h per micro-batch per boundary, orders of magnitude less than tensor
#   parallelism: it is the dimension that crosses nodes.
#
# ## Your turn
#
# 1. Write a schedule by hand for p = 2, m = 2 that `validate` accepts but that idles more than GPipe,
#    and one that deadlocks; read the validator's message.
# 2. Add a link cost to `explore` (`link=0.5`, half a forward) and find the m at which interleaving
#    stops paying off against 1F1B.
# 3. Make the head stage twice as expensive (a cost function of the action for `simulate`) and see
#    which schedule suffers most; how would you re-balance the layers?
# 4. ZB-H1 runs rank r's weight passes r micro-batches late. Change the lag in `zb_h1` and measure the
#    bubble and peak memory with `simulate` and `validate`.
