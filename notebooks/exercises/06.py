# %% [markdown]
# ## Your turn
#
# Megatron-LM's two linear layers (Shoeybi et al. 2019, section 3), one rank at a time: the check
# runs your function for every rank and compares what the ranks compute together with
# `F.linear(x, weight, bias)` in float64. `weight` has nn.Linear's shape `(out_features, in_features)`.
# Stuck? `print(solution("06.column_parallel_linear"))`.
#
# **1. Column-parallel.** Rank `r` of `world` computes output features `r·k … (r+1)·k - 1`, with
# `k = out_features / world`: its slice of the weight's rows and of the bias. No communication in forward.

# %%
# NBVAL_CHECK_OUTPUT
import torch
import torch.nn.functional as F

from course.exercises import lesson06 as ex, solution


def column_parallel_linear(x, weight, bias, rank, world):
    """x (..., in) -> this rank's output features (..., out / world)."""
    raise NotImplementedError  # your code here


ok = ex.check_column_parallel_linear(column_parallel_linear)

# %% [markdown]
# **2. Row-parallel.** Rank `r` holds input features `r·k … (r+1)·k - 1` (`x_shard`) and returns a
# partial output `(..., out)`. The all-reduce sums the partial outputs of all ranks, so add the bias on
# one rank only (rank 0).

# %%
# NBVAL_CHECK_OUTPUT
def row_parallel_linear(x_shard, weight, bias, rank, world):
    raise NotImplementedError  # your code here


ok = ex.check_row_parallel_linear(row_parallel_linear)
