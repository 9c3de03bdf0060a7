# %% [markdown]
# ## Your turn
#
# Stuck? `print(solution("11.online_softmax_stats"))`.
#
# **1. The online softmax** (Milakov & Gimelshein 2018). `chunks` is an iterator of 1-D tensors that can
# be read once. Return `m`, the maximum of all values, and `l = sum(exp(x - m))`, in one pass. Whenever a
# chunk raises the maximum from `m` to `m'`, the sum so far is too large by a factor `exp(m' - m)`.

# %%
# NBVAL_CHECK_OUTPUT
import math

import torch

from course.exercises import lesson11 as ex, solution


def online_softmax_stats(chunks):
    raise NotImplementedError  # your code here


ok = ex.check_online_softmax_stats(online_softmax_stats)

# %% [markdown]
# **2. Attention, one key block at a time** (FlashAttention, Dao et al. 2022, algorithm 1). For `q (T, d)`,
# `k (S, d)`, `v (S, dv)`, compute `softmax(q kᵀ / sqrt(d)) v` over blocks of `block` keys. Keep, per
# query, the running max, the running sum and the unnormalised output; rescale them when the max grows.
# The check watches every tensor your code creates: none may be as large as the `(T, S)` score matrix.

# %%
# NBVAL_CHECK_OUTPUT
def online_attention(q, k, v, block):
    raise NotImplementedError  # your code here


ok = ex.check_online_attention(online_attention)
