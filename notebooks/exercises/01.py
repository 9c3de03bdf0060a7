# %% [markdown]
# ## Your turn
#
# Write the three pieces of this lesson yourself. Each check runs your function on random cases
# against the library (`course.model.causal_mask`, `course.attention`) in float64 and prints a pass or
# one hint. Stuck? `print(solution("01.causal_mask"))` shows a reference answer.
#
# **1. The causal mask.** `causal_mask(T)` is a `(T, T)` boolean tensor, True where query `i` may attend
# key `j`: itself and every earlier token.

# %%
# NBVAL_CHECK_OUTPUT
import torch

from course.exercises import lesson01 as ex, solution


def causal_mask(T):
    """(T, T) bool, True where query i may attend key j."""
    raise NotImplementedError  # your code here


ok = ex.check_causal_mask(causal_mask)

# %% [markdown]
# **2. A softmax that does not overflow.** `exp(750)` is infinite even in float64. Subtracting each
# row's maximum first changes nothing mathematically (it cancels between numerator and denominator) and
# keeps every exponent <= 0. Masked scores are `-inf` and must get weight 0. Do not modify the input.

# %%
# NBVAL_CHECK_OUTPUT
def softmax(scores, dim=-1):
    """exp(s - max) / sum exp(s - max) along dim."""
    raise NotImplementedError  # your code here


ok = ex.check_softmax(softmax)

# %% [markdown]
# **3. Self-attention, written out.** `softmax(q kᵀ / sqrt(d_k)) v` for `q (B, nh, T, hs)`,
# `k, v (B, nh, S, hs)`; with `causal=True` (then S = T) every query ignores later keys. Return the
# output `(B, nh, T, hs)`. Use your `softmax` and `causal_mask` from above.

# %%
# NBVAL_CHECK_OUTPUT
def self_attention(q, k, v, causal=False):
    raise NotImplementedError  # your code here


ok = ex.check_self_attention(self_attention)
