# %% [markdown]
# ## Your turn
#
# Three pieces of recomputation, each checked against `course.recompute` and `course.costs`.
# Stuck? `print(solution("04.sqrt_segments"))`.
#
# **1. The √n segments** (Chen et al. 2016). Split blocks `0 … n-1` into consecutive segments of
# `m = ceil(sqrt(n))` blocks (the last one takes what is left), as `(start, stop)` pairs with `stop`
# exclusive.

# %%
# NBVAL_CHECK_OUTPUT
import math

import torch
from torch.utils.checkpoint import checkpoint

from course.exercises import lesson04 as ex, solution


def sqrt_segments(n):
    raise NotImplementedError  # your code here


ok = ex.check_sqrt_segments(sqrt_segments)

# %% [markdown]
# **2. The bytes a block keeps.** Write the formula of section 1 as a function: the bytes one
# `course.model.Block` saves for backward in fp32 (4 bytes per element) with fused attention and no
# dropout, for `s` tokens, batch `b`, width `h` and `a` heads. Count every saved tensor, including the
# LayerNorm statistics and the attention's log-sum-exp. The hint tells you which terms you are missing.

# %%
# NBVAL_CHECK_OUTPUT
def block_bytes(s, b, h, a):
    raise NotImplementedError  # your code here


ok = ex.check_block_bytes(block_bytes)

# %% [markdown]
# **3. A checkpointed segment runner.** Run `blocks` on `x` segment by segment, where `segments` is a list of
# `(start, stop, checkpointed)` (what `course.recompute.segments_for` returns). Run a checkpointed
# segment under `checkpoint(fn, x, use_reentrant=False)`, so backward recomputes it. The check counts
# how often each block runs and compares outputs and gradients with a plain run.

# %%
# NBVAL_CHECK_OUTPUT
def run_segments(blocks, x, segments):
    raise NotImplementedError  # your code here


ok = ex.check_run_segments(run_segments)
