# %% [markdown]
# ## Your turn
#
# A schedule is data: for each stage, the list of actions it runs, `("F", i)` for the forward of
# micro-batch `i` and `("B", i)` for its backward. Stuck? `print(solution("07.one_f_one_b"))`.
#
# **1. 1F1B** (Narayanan et al. 2021, section 2.2). Stage `s` of `p` runs `min(p - s - 1, m)` warm-up
# forwards. Then it alternates one forward and one backward until every forward has run, and finishes with
# the remaining backwards. It never holds more than `p - s` micro-batches' activations, where GPipe holds all `m`.

# %%
# NBVAL_CHECK_OUTPUT
from course.exercises import lesson07 as ex, solution


def one_f_one_b(n_stages, n_micro, stage):
    """-> list of ("F", i) / ("B", i) for this stage."""
    raise NotImplementedError  # your code here


ok = ex.check_one_f_one_b(one_f_one_b)

# %% [markdown]
# **2. The bubble.** Under GPipe (Huang et al. 2019), what share of the total time does a stage sit
# idle, with `p` stages and `m` micro-batches? The check runs a simulated pipeline (forward 1, backward
# 2 time units) and compares your formula with the idle share it measures.

# %%
# NBVAL_CHECK_OUTPUT
def bubble_fraction(n_stages, n_micro):
    raise NotImplementedError  # your code here


ok = ex.check_bubble_fraction(bubble_fraction)
