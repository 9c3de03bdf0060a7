# %% [markdown]
# ## N. Checkpoints, kills and resumes
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
# writes. **Asynchronous checkpointing** (CheckFreq's snapshot/persist split, section 4.3; `dcp.async_save`)
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
