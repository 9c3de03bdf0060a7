"""Lesson 02 (BERT vs GPT): the cloze items and the word statistics the comparison table uses."""
from __future__ import annotations

import re

import torch


def make_word_start_cloze(ids: torch.Tensor, tok, n: int, length: int, n_candidates: int = 4,
                          generator: torch.Generator | None = None):
    """Cloze items whose answer needs the right-hand context: the first letter of a word.

    Windows of `length` tokens from `ids` (1-D) with the blank in the middle, placed on a lowercase
    letter that follows a space and is followed by at least two more letters ("the ?ython ...").
    The left context says only "a word starts here"; the rest of the word says which one.
    Candidates: the answer plus n_candidates-1 other lowercase letters drawn in proportion to how often
    each letter starts a word, so the prior alone does not give the answer away; answer at a random slot.
    Returns dict(x (n, length), pos (n,), candidates (n, K), answer (n,)). Needs a character tokenizer."""
    if n <= 0 or length < 4 or n_candidates < 2:
        raise ValueError(f"need n > 0, length >= 4, n_candidates >= 2; got {n}, {length}, {n_candidates}")
    letters = [tok.encode(c)[0] for c in "abcdefghijklmnopqrstuvwxyz"]
    if len(set(letters)) != 26 or any(len(tok.encode(c)) != 1 for c in "a "):
        raise ValueError("make_word_start_cloze needs a character tokenizer with all 26 lowercase letters")
    is_letter = torch.isin(ids, torch.tensor(letters))
    space = tok.encode(" ")[0]
    half = length // 2
    w = torch.arange(max(half, 1), len(ids) - length + half + 1)  # blank positions whose window fits
    w = w[w + 2 < len(ids)]
    where = w[(ids[w - 1] == space) & is_letter[w] & is_letter[w + 1] & is_letter[w + 2]]
    if len(where) < n:
        raise ValueError(f"only {len(where)} word starts available, asked for n={n}")
    letters_t = torch.tensor(letters)
    freq = (ids[where][:, None] == letters_t[None, :]).sum(0).double()  # (26,) word-initial letter counts
    where = where[torch.randperm(len(where), generator=generator)[:n]]
    x = torch.stack([ids[w - half:w - half + length] for w in where])  # (n, length)
    pos = torch.full((n,), half)
    cands, answer = [], []
    for i in range(n):
        true = x[i, half]
        p = (freq + 1) * (letters_t != true)  # distractors as frequent as real word starts, never the answer
        pick = letters_t[torch.multinomial(p, n_candidates - 1, replacement=False, generator=generator)]
        slot = int(torch.randint(n_candidates, (1,), generator=generator))
        cands.append(torch.cat([pick[:slot], true[None], pick[slot:]]))
        answer.append(slot)
    return dict(x=x, pos=pos, candidates=torch.stack(cands), answer=torch.tensor(answer))


_WORD = re.compile(r"[A-Za-z]{2,}")


def real_word_rate(text: str, vocabulary: set[str]) -> float:
    """Share of the alphabetic words (2+ letters) in `text` that occur in `vocabulary`
    (e.g. the words of the training text): a crude, cheap generation-quality score."""
    words = _WORD.findall(text)
    if not words:
        return 0.0
    return sum(w.lower() in vocabulary for w in words) / len(words)


def vocabulary(text: str) -> set[str]:
    """Lower-cased alphabetic words (2+ letters) of a text."""
    if not text:
        raise ValueError("vocabulary: text is empty; pass the (non-empty) training corpus")
    return {w.lower() for w in _WORD.findall(text)}
