# %% [markdown]
# ## Your turn
#
# Three exercises on the pieces every chapter shares. Replace each `raise NotImplementedError` with
# your code and run the cell: the check runs your function on random cases against the library
# (`course.data`, `course.objectives`) and prints a pass, or one hint saying what is wrong.
# Stuck? `print(solution("00.char_tokenizer"))` shows a reference answer.
#
# **1. A character tokenizer.** Return two functions, `encode(text) -> list of ids` and
# `decode(ids) -> str`. Ids 0–4 are the special tokens `[PAD] [UNK] [CLS] [SEP] [MASK]`; then one id per
# distinct character of the training text, in sorted order; a character never seen maps to `[UNK]` = 1.

# %%
# NBVAL_CHECK_OUTPUT
from course.exercises import lesson00 as ex, solution


def char_tokenizer(text):
    """-> (encode, decode) for the characters of `text`."""
    raise NotImplementedError  # your code here


ok = ex.check_char_tokenizer(char_tokenizer)

# %% [markdown]
# **2. Next-token targets.** A window of `T + 1` tokens gives `T` training examples: the inputs `x` and,
# at every position, the token that comes next.

# %%
# NBVAL_CHECK_OUTPUT
def next_token_targets(window):
    """window (B, T+1) token ids -> (x, y), both (B, T): y[:, t] is the token after x[:, t]."""
    raise NotImplementedError  # your code here


ok = ex.check_next_token_targets(next_token_targets)

# %% [markdown]
# **3. Tokens per step.** How many tokens does one optimizer step learn from, with `batch_size`
# sequences of `block_size` tokens per micro-batch, `grad_accum` micro-batches summed before the step,
# on each of `world` data-parallel ranks? (GPT-3 175B used batches of 3.2M tokens, Brown et al. 2020,
# table 2.1.)

# %%
# NBVAL_CHECK_OUTPUT
def tokens_per_step(batch_size, block_size, grad_accum=1, world=1):
    raise NotImplementedError  # your code here


ok = ex.check_tokens_per_step(tokens_per_step)
