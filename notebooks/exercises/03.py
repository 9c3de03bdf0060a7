# %% [markdown]
# ## Your turn
#
# Build three patterns of this lesson yourself; each check compares your layout or mask with
# `course.sparse.patterns` and names the first block or token pair that differs.
# Stuck? `print(solution("03.sliding_window_layout"))`.
#
# **1. A sliding-window block layout.** With `nb = ceil(seq_len / block_size)` blocks, block `(I, J)` is
# kept iff some query `i` of block `I` may attend some key `j` of block `J`: `|i - j| <= window`
# (causal: `0 <= i - j <= window`). Mind the last block when `seq_len` is not a multiple of `block_size`.

# %%
# NBVAL_CHECK_OUTPUT
import math

import torch

from course.exercises import lesson03 as ex, solution


def sliding_window_layout(seq_len, window, block_size, causal=False):
    """-> (nb, nb) bool block layout."""
    raise NotImplementedError  # your code here


ok = ex.check_sliding_window_layout(sliding_window_layout)

# %% [markdown]
# **2. A BigBird layout** (Zaheer et al. 2020). Three parts, all in blocks: a window
# (`|I - J| <= window_blocks // 2`), global blocks (their rows attend everything and everything attends
# their columns) and, for each query block `I`, the key blocks listed in `random_blocks[I]` (drawn for you).

# %%
# NBVAL_CHECK_OUTPUT
def bigbird_layout(n_blocks, window_blocks, global_blocks, random_blocks):
    """-> (n_blocks, n_blocks) bool."""
    raise NotImplementedError  # your code here


ok = ex.check_bigbird_layout(bigbird_layout)

# %% [markdown]
# **3. The Sparse Transformer's strided pattern** (Child et al. 2019, section 4.2), both parts in one
# head: query `i` sees key `j` iff `j <= i` and either `i - j <= stride` (the local part, A1) or
# `(i - j) % stride == 0` (the strided part, A2).

# %%
# NBVAL_CHECK_OUTPUT
def strided_mask(T, stride):
    """-> (T, T) bool, True where query i may attend key j."""
    raise NotImplementedError  # your code here


ok = ex.check_strided_mask(strided_mask)
