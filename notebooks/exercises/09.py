# %% [markdown]
# ## Your turn
#
# Three things every long run needs. Stuck? `print(solution("09.resume"))`.
#
# **1. Resume from a checkpoint, exactly.** `save_checkpoint` writes everything needed to continue.
# `load_checkpoint` restores it in place into fresh objects and returns the step to continue from. The
# check trains 6 steps straight, and separately 3 steps, save, restore into a fresh model, optimizer and
# data generator, then 3 more steps. The two runs must end with bit-identical weights.

# %%
# NBVAL_CHECK_OUTPUT
import torch

from course.exercises import lesson09 as ex, solution


def save_checkpoint(path, model, optimizer, step, generator):
    raise NotImplementedError  # your code here


def load_checkpoint(path, model, optimizer, generator):
    raise NotImplementedError  # your code here


ok = ex.check_resume((save_checkpoint, load_checkpoint))

# %% [markdown]
# **2. Clip by the global norm.** If the L2 norm of all gradients together exceeds `max_norm`, scale every
# tensor by `max_norm / norm`; otherwise leave them unchanged. GPT-3 clips at 1.0 (Brown et al. 2020,
# appendix B). Return new tensors.

# %%
# NBVAL_CHECK_OUTPUT
def clip_by_global_norm(grads, max_norm):
    raise NotImplementedError  # your code here


ok = ex.check_clip_by_global_norm(clip_by_global_norm)

# %% [markdown]
# **3. Warmup, then cosine decay** (`course.train.lr_at`). During warmup the rate rises linearly,
# `lr·(step + 1)/warmup_steps`. Then it follows half a cosine from `lr` down to `min_lr` at `max_steps`,
# and stays at `min_lr` after that.

# %%
# NBVAL_CHECK_OUTPUT
import math


def lr_at(step, lr, min_lr, warmup_steps, max_steps):
    raise NotImplementedError  # your code here


ok = ex.check_lr_at(lr_at)
