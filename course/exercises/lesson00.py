"""Lesson 00 (tour): a character tokenizer, next-token targets, tokens per optimizer step.

References: `course.data.CharTokenizer` (ids 0-4 reserved for [PAD] [UNK] [CLS] [SEP] [MASK], then
one id per character in sorted order) and `course.objectives.causal_lm_targets`.
"""
from __future__ import annotations

import torch

from course.data import SPECIAL_TOKENS, CharTokenizer, load_corpus
from course.objectives import causal_lm_targets

from .core import Hint, call, exercise, expect_tensor

UNK = 1


def _char_tokenizer(text):
    tok = CharTokenizer.train(text)
    return tok.encode, tok.decode


@exercise("00", "char_tokenizer", solution=_char_tokenizer)
def check_char_tokenizer(fn, rng, gen):
    """char_tokenizer(text) -> (encode, decode): ids 0-4 are the special tokens, then one id per
    distinct character of `text` in sorted order; a character not in `text` encodes to [UNK] = 1."""
    corpus = load_corpus("pydoc")
    cases = 8
    for _ in range(cases):
        start = rng.randrange(len(corpus) - 2000)
        text = corpus[start:start + rng.randrange(200, 2000)]
        pair = call(fn, text, describe="char_tokenizer(text)")
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(callable(f) for f in pair)):
            raise Hint("char_tokenizer(text) should return two functions: (encode, decode)")
        encode, decode = pair
        ref = CharTokenizer.train(text)
        a = rng.randrange(len(text) - 60)
        sample = text[a:a + 60]
        got = [int(i) for i in call(encode, sample, describe=f"encode({sample[:20]!r}...)")]
        want = ref.encode(sample)
        if got != want:
            k = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
            if len(got) != len(want):
                raise Hint(f"encode gave {len(got)} ids for {len(sample)} characters: one id per character")
            ch = sample[k]
            if all(g == w - len(SPECIAL_TOKENS) for g, w in zip(got, want)):
                raise Hint(f"your ids start at 0, but ids 0-4 are reserved for {' '.join(SPECIAL_TOKENS)}: "
                           f"the first character of sorted(set(text)) gets id 5 ({ch!r} should be {want[k]}, "
                           f"yours is {got[k]})")
            raise Hint(f"{ch!r} encodes to {got[k]}, expected {want[k]}: ids follow sorted(set(text)), "
                       f"after the 5 special tokens")
        back = call(decode, got, describe="decode(ids)")
        if back != sample:
            raise Hint(f"decode(encode(s)) should give s back: got {back[:30]!r}..., expected {sample[:30]!r}...")
        unseen = next(c for c in "€☃∑ΩЖ" if c not in text)
        got = call(encode, unseen, describe=f"encode({unseen!r})",
                   errors={KeyError: f"encode({unseen!r}) raised KeyError: a character that is not in the "
                                     f"training text should map to [UNK] = {UNK} (dict.get(ch, {UNK}))"})
        if [int(i) for i in got] != [UNK]:
            raise Hint(f"encode({unseen!r}) gave {list(got)}: an unseen character should map to [UNK] = {UNK}")
    return f"{cases} random texts"


def _next_token_targets(window):
    return causal_lm_targets(window)


@exercise("00", "next_token_targets", solution=_next_token_targets)
def check_next_token_targets(fn, rng, gen):
    """next_token_targets(window) -> (x, y): window (B, T+1) token ids; x (B, T) the inputs, y (B, T)
    the targets, y[:, t] = the token that follows x[:, t]."""
    cases = 10
    for _ in range(cases):
        B, T = rng.randint(1, 4), rng.randint(2, 12)
        window = torch.randint(5, 100, (B, T + 1), generator=gen)
        out = call(fn, window.clone())
        if not (isinstance(out, tuple) and len(out) == 2):
            raise Hint("next_token_targets(window) should return a pair (x, y)")
        x, y = out
        expect_tensor(x, f"x (window of shape {tuple(window.shape)})", shape=(B, T))
        expect_tensor(y, f"y (window of shape {tuple(window.shape)})", shape=(B, T))
        want_x, want_y = causal_lm_targets(window)
        if torch.equal(x, want_y) and torch.equal(y, want_x):
            raise Hint("x and y are swapped: x = window[:, :-1] (what the model reads), y = window[:, 1:] "
                       "(what it should predict)")
        if not torch.equal(x, want_x):
            raise Hint("x should be the window without its last token: nothing is predicted after the last one")
        if torch.equal(y, x):
            raise Hint("y equals x: the target at position t is the NEXT token, window[:, t + 1]")
        if not torch.equal(y, want_y):
            t = int((y != want_y).any(0).nonzero()[0])
            raise Hint(f"y[:, {t}] should be window[:, {t + 1}] (the token after x[:, {t}])")
    return f"{cases} random windows"


def _tokens_per_step(batch_size, block_size, grad_accum=1, world=1):
    return batch_size * block_size * grad_accum * world


@exercise("00", "tokens_per_step", solution=_tokens_per_step)
def check_tokens_per_step(fn, rng, gen):
    """tokens_per_step(batch_size, block_size, grad_accum=1, world=1) -> tokens one optimizer step
    learns from: `batch_size` sequences of `block_size` tokens per micro-batch on each of `world`
    data-parallel ranks, `grad_accum` micro-batches summed before each step."""
    # distinct primes, so a missing or doubled factor is identified by the ratio
    cases = [(3, 5, 7, 11), (2, 13, 1, 1), (17, 4, 3, 2), (1, 2048, 1, 1)]
    for B, T, M, N in cases:
        got = call(fn, B, T, M, N)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Hint(f"tokens_per_step({B}, {T}, {M}, {N}) should return a number, got {type(got).__name__}")
        want = B * T * M * N
        if got == want:
            continue
        names = {"grad_accum": M, "world": N, "batch_size": B, "block_size": T}
        for name, v in names.items():
            if v > 1 and got * v == want:
                raise Hint(f"with batch_size={B}, block_size={T}, grad_accum={M}, world={N} you return {got}: "
                           f"the factor {name} = {v} is missing")
        raise Hint(f"tokens_per_step({B}, {T}, {M}, {N}) returned {got}, expected {want} "
                   f"(sequences x tokens x micro-batches x ranks)")
    return f"{len(cases)} cases"
