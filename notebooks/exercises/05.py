# %% [markdown]
# ## Your turn
#
# Build the three parts of data parallelism yourself, on one process. Stuck? `print(solution("05.make_buckets"))`.
#
# **1. Gradient buckets.** Put the parameters into buckets the way `DataParallel` does (Li et al. 2020,
# section 3.2): walk them in reverse (the order in which backward produces their gradients), add each to
# the current bucket, and close the bucket as soon as it holds `>= cap_bytes` bytes. The check compares
# your buckets with the ones `course.parallel.data_parallel.DataParallel` builds.

# %%
# NBVAL_CHECK_OUTPUT
import torch

from course.exercises import lesson05 as ex, solution


def make_buckets(params, cap_bytes):
    """-> list of buckets, each a list of parameters."""
    raise NotImplementedError  # your code here


ok = ex.check_make_buckets(make_buckets)

# %% [markdown]
# **2. A bucketed all-reduce from gradient hooks.** Register `p.register_post_accumulate_grad_hook(hook)`
# on every parameter. When a bucket's last gradient has arrived, flatten the bucket's gradients into one
# tensor and start `work = comm.all_reduce(flat, async_op=True)` at once, while backward goes on. Return
# `finish()`, which runs after backward: `work.wait()` for each bucket, divide by `comm.world`, copy the
# averages back into `p.grad`, and reset for the next step. The check's `comm` pretends to be rank 0 of
# 4 ranks whose gradients are 1×, 2×, 3× and 4× this one's, so the average is 2.5× your own gradient.

# %%
# NBVAL_CHECK_OUTPUT
def install_bucketed_all_reduce(buckets, comm):
    """Register the hooks; return finish()."""
    raise NotImplementedError  # your code here


ok = ex.check_bucketed_all_reduce(install_bucketed_all_reduce)

# %% [markdown]
# **3. ZeRO's memory per rank** (Rajbhandari et al. 2020, section 3). With mixed-precision Adam, each
# parameter costs 2 bytes (fp16 weight) + 2 (fp16 gradient) + 12 (fp32 master weight, momentum,
# variance). Stage 1 shards the optimizer state over `world` ranks, stage 2 also the gradients, stage 3
# also the parameters; stage 0 is plain data parallelism. Return the total bytes per rank.

# %%
# NBVAL_CHECK_OUTPUT
def zero_bytes_per_rank(n_params, stage, world):
    raise NotImplementedError  # your code here


ok = ex.check_zero_bytes(zero_bytes_per_rank)
