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


def corruption_demo(sentence: str, tok, seed: int = 10) -> list[str]:
    """What each objective sees and scores for one sentence: GPT's shifted targets, BERT's 80/10/10."""
    from .. import objectives as ob
    x = torch.tensor([tok.encode(sentence)])
    gpt_in, gpt_tgt = ob.causal_lm_targets(x)
    show = lambda ids: "".join("·" if i == -100 else ("#" if i == tok.mask_id else tok.decode([i])) for i in ids.tolist())
    wrapped = ob.add_special_tokens(x, tok)  # [CLS] sentence [SEP]
    bert_in, bert_lab = ob.mask_tokens(wrapped, tok, rate=0.15, generator=torch.Generator().manual_seed(seed))
    sel = bert_lab[0] != -100
    n_mask = ((bert_in[0] == tok.mask_id) & sel).sum().item()
    n_random = (sel & (bert_in[0] != wrapped[0]) & (bert_in[0] != tok.mask_id)).sum().item()
    n_kept = (sel & (bert_in[0] == wrapped[0])).sum().item()
    return [f"GPT  input  : {show(gpt_in[0])}",
            f"GPT  target : {show(gpt_tgt[0])}   (every position predicts the next character)",
            f"BERT input  : {show(bert_in[0, 1:-1])}   (# = [MASK]; [CLS] and [SEP] around it not shown)",
            f"BERT labels : {show(bert_lab[0, 1:-1])}   (· = no loss here)",
            f"selected {sel.sum().item()} of {len(sentence)}: {n_mask} -> [MASK], {n_random} -> random, "
            f"{n_kept} kept; GPT scores all {gpt_tgt.numel()} positions"]


def compare_models(gpt, bert, data, length: int, device=None) -> dict:
    """The lesson's table: perplexity, real words in generations, one-pass and rescoring cloze accuracy."""
    from .. import objectives as ob
    from ..data import load_corpus
    tok = data.tokenizer
    x_val, _ = data.batch("val", 64, length + 1, generator=torch.Generator().manual_seed(1), device=device)
    ppl = {"GPT": ob.perplexity(gpt, x_val), "BERT": ob.perplexity(bert, x_val, tok)}
    words = vocabulary(load_corpus("pydoc"))
    prompt = torch.tensor([tok.encode("The return statement ")] * 4, device=device)
    samples, real = {}, {}
    for name, model in (("GPT", gpt), ("BERT", bert)):
        out = ob.generate(model, prompt, 200, tok, temperature=0.8, top_k=20,
                          generator=torch.Generator(device=device).manual_seed(2))
        samples[name] = [tok.decode(o[prompt.size(1):].tolist()) for o in out]
        real[name] = real_word_rate(" ".join(samples[name]), words)
    items = make_word_start_cloze(data.val, tok, n=1000, length=length, n_candidates=4,
                                  generator=torch.Generator().manual_seed(3))
    items = {k: v.to(device) for k, v in items.items()}
    cloze = {meth: ob.cloze_accuracy(model, items["x"], items["pos"], items["candidates"], items["answer"], meth, tok)
             for meth, model in (("mask", bert), ("left", gpt), ("rescore", gpt))}
    return {"ppl": ppl, "real": real, "cloze": cloze, "samples": samples}


def table(res: dict) -> str:
    rows = [("validation perplexity (next char, lower is better)", f"{res['ppl']['GPT']:.2f}", f"{res['ppl']['BERT']:.2f}"),
            ("generated words found in the training text", f"{res['real']['GPT']:.0%}", f"{res['real']['BERT']:.0%}"),
            ("cloze accuracy, 4 choices, one pass", f"{res['cloze']['left']:.0%} (left only)", f"{res['cloze']['mask']:.0%}"),
            ("cloze accuracy, GPT rescoring (4 passes)", f"{res['cloze']['rescore']:.0%}", "-")]
    return "\n".join([f"{'':52s} {'GPT':>18s} {'BERT':>8s}"] + [f"{a:52s} {b:>18s} {c:>8s}" for a, b, c in rows])
