"""Lesson 02 (BERT vs GPT): BERT's 80/10/10 masking, the prefix-LM mask.

References: `course.objectives.mask_tokens` (Devlin et al. 2018, section 3.1 and appendix A.1) and
`course.objectives.prefix_lm_mask` (Dong et al. 2019; Raffel et al. 2020, section 3.2).

The masking check is statistical. Each share is compared with its expected value p within 5 binomial
standard deviations, 5·sqrt(p(1-p)/n) for n trials: a correct implementation falls outside with
probability below 6e-7 per statistic, and the sizes below make the bands narrow enough to tell 80% from
90% (and 10% from 0% or 20%). The bands come from the binomial model, not from any run.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from course.objectives import mask_tokens, prefix_lm_mask

from .core import Hint, call, exercise, expect_tensor, first_mask_difference

TOK = SimpleNamespace(vocab_size=40, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4,
                      special_ids=frozenset(range(5)))
Z = 5.0  # standard deviations


def _within(share: float, p: float, n: int) -> bool:
    return abs(share - p) <= Z * math.sqrt(p * (1 - p) / n)


def _band(p: float, n: int) -> str:
    return f"{p:.1%} ± {Z * math.sqrt(p * (1 - p) / n):.1%}"


def _batch(gen, B=400, T=130):
    x = torch.randint(5, TOK.vocab_size, (B, T), generator=gen)
    x[:, 0], x[:, -1] = TOK.cls_id, TOK.sep_id
    x[::5, 60:80] = TOK.pad_id  # padding: special, never selected
    return x


@exercise("02", "mask_tokens", solution=mask_tokens)
def check_mask_tokens(fn, rng, gen):
    """mask_tokens(x, tok, rate=0.15, generator=None) -> (inputs, labels): select each non-special
    position with probability `rate`; of the selected, 80% become [MASK], 10% a random non-special token,
    10% stay; labels = the original token at selected positions, -100 elsewhere."""
    specials = torch.tensor(sorted(TOK.special_ids))
    n_normal = TOK.vocab_size - len(TOK.special_ids)
    for rate in (0.15, 0.3):
        x = _batch(gen)
        seed = rng.randrange(2**31)
        out = call(fn, x.clone(), TOK, rate=rate, generator=torch.Generator().manual_seed(seed))
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Hint("mask_tokens should return a pair (inputs, labels)")
        inputs, labels = (expect_tensor(t, name, shape=x.shape) for t, name in zip(out, ("inputs", "labels")))
        selected = labels != -100
        special = torch.isin(x, specials)
        if selected.all():
            raise Hint("every position has a label: labels must be -100 (ignored by the loss) where the token "
                       "was not selected")
        if (selected & special).any():
            raise Hint("a special token ([CLS], [SEP] or [PAD]) was selected: only normal tokens may be masked")
        if not torch.equal(labels[selected], x[selected]):
            raise Hint("labels at the selected positions must be the ORIGINAL tokens (what the model must restore)")
        if not torch.equal(inputs[~selected], x[~selected]):
            raise Hint("a position without a label was changed: only selected positions are corrupted")
        n_cand, n_sel = int((~special).sum()), int(selected.sum())
        if not _within(n_sel / n_cand, rate, n_cand):
            raise Hint(f"with rate={rate} you selected {n_sel / n_cand:.1%} of the normal tokens, expected "
                       f"{_band(rate, n_cand)}")
        masked = selected & (inputs == TOK.mask_id)
        kept = selected & (inputs == x)
        randomised = selected & ~masked & ~kept
        if torch.isin(inputs[randomised], specials).any():
            raise Hint("a random replacement is a special token: draw random tokens from the normal ids only")
        # a random replacement equal to the original token counts as kept: 1 chance in n_normal
        shares = {"became [MASK]": (masked, 0.8), "kept their token": (kept, 0.1 + 0.1 / n_normal),
                  "got a random token": (randomised, 0.1 * (1 - 1 / n_normal))}
        for what, (where, p) in shares.items():
            share = int(where.sum()) / n_sel
            if not _within(share, p, n_sel):
                raise Hint(f"{share:.1%} of the selected positions {what}, expected {_band(p, n_sel)}: "
                           f"BERT replaces 80% with [MASK], 10% with a random token and leaves 10% unchanged")
        again = call(fn, x.clone(), TOK, rate=rate, generator=torch.Generator().manual_seed(seed))
        if not (torch.equal(again[0], inputs) and torch.equal(again[1], labels)):
            raise Hint("two calls with generators seeded alike gave different masks: draw every random number "
                       "from `generator` (torch.rand(..., generator=generator))")
    return f"{2 * x.numel():,} positions at rates 0.15 and 0.3 (shares within {Z:.0f} binomial std)"


@exercise("02", "prefix_lm_mask", solution=prefix_lm_mask)
def check_prefix_lm_mask(fn, rng, gen):
    """prefix_lm_mask(T, prefix_len) -> (T, T) bool, True where query i may attend key j: every key of
    the prefix (j < prefix_len), and earlier keys after it (j <= i)."""
    cases = [(6, 0), (6, 6), (5, 1)] + [(T, rng.randint(1, T - 1)) for T in (rng.randint(4, 14) for _ in range(5))]
    for T, p in cases:
        got = expect_tensor(call(fn, T, p), f"prefix_lm_mask({T}, {p})", shape=(T, T), dtype=torch.bool)

        def extra(i, j):
            return (f"prefix_lm_mask({T}, prefix_len={p}) lets query {i} see key {j}: key {j} is after the prefix "
                    f"and after the query; from the prefix on, attention is causal")

        def missing(i, j):
            why = (f"key {j} is in the prefix, which every query sees (bidirectional)" if j < p
                   else f"key {j} is not after query {i} (causal part)")
            return f"prefix_lm_mask({T}, prefix_len={p}) hides key {j} from query {i}: {why}"
        first_mask_difference(got, prefix_lm_mask(T, p), extra, missing)
    return f"{len(cases)} (T, prefix_len) pairs, including prefix_len 0 (causal) and T (bidirectional)"
