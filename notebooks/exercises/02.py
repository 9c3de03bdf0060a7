# %% [markdown]
# ## Your turn
#
# Write both ways of hiding information yourself. Each check compares your function with
# `course.objectives` and prints a pass or one hint. Stuck? `print(solution("02.mask_tokens"))`.
#
# **1. BERT's 80/10/10 masking** (Devlin et al. 2018, section 3.1). Select each non-special token with
# probability `rate`. Of the selected ones, 80% become `[MASK]`, 10% a random non-special token, 10% stay
# as they are. `labels` holds the original token at selected positions and -100 (ignored by the loss)
# everywhere else. Draw every random number from `generator`. The check is statistical: each share must
# fall within 5 binomial standard deviations of its expected value on about 50,000 positions.

# %%
# NBVAL_CHECK_OUTPUT
import torch

from course.exercises import lesson02 as ex, solution


def mask_tokens(x, tok, rate=0.15, generator=None):
    """x (B, T) ids -> (inputs, labels), both (B, T). tok has mask_id, vocab_size, special_ids."""
    raise NotImplementedError  # your code here


ok = ex.check_mask_tokens(mask_tokens)

# %% [markdown]
# **2. The prefix-LM mask** (UniLM, Dong et al. 2019; T5, Raffel et al. 2020, section 3.2). Every query
# sees the whole prefix (bidirectional); after the prefix, attention is causal. `prefix_len = 0` gives
# GPT's triangle, `prefix_len = T` BERT's full attention.

# %%
# NBVAL_CHECK_OUTPUT
def prefix_lm_mask(T, prefix_len):
    """(T, T) bool, True where query i may attend key j."""
    raise NotImplementedError  # your code here


ok = ex.check_prefix_lm_mask(prefix_lm_mask)
