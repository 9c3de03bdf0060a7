"""Objectives of lesson 02: loss shifting, BERT's 80/10/10 masking, the prefix-LM mask, evaluation helpers."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from course import objectives as ob
from course.lessons import bert_vs_gpt as bvg
from course.model import ModelConfig, Transformer

V = 40
TOK = SimpleNamespace(vocab_size=V, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4,
                      special_ids=frozenset(range(5)))


def tiny(causal=True, **kw):
    """float64: the comparisons below are mathematical identities (the same quantity computed two ways),
    so they hold to float64 rounding, ~1e-16 relative, far inside the bounds used."""
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32,
                                   causal=causal, mlm_head=True, **kw)).double().eval()


def ids(*shape, seed=0):
    return torch.randint(5, V, shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- causal LM

def test_causal_targets_are_inputs_shifted_by_one():
    x = ids(3, 9)
    inp, tgt = ob.causal_lm_targets(x)
    assert inp.shape == tgt.shape == (3, 8)
    assert torch.equal(inp, x[:, :-1]) and torch.equal(tgt, x[:, 1:])
    ignore = torch.zeros_like(x, dtype=torch.bool)
    ignore[:, 4] = True
    _, tgt = ob.causal_lm_targets(x, ignore)
    assert (tgt[:, 3] == -100).all() and (tgt[:, 4] == x[:, 5]).all()


def test_causal_loss_predicts_the_next_token():
    model, x = tiny(), ids(2, 10)
    logits = model(x[:, :-1])[0]  # (B, T, V)
    manual = -logits.log_softmax(-1).gather(2, x[:, 1:, None]).mean()
    assert ob.causal_lm_loss(model, x).item() == pytest.approx(manual.item(), rel=1e-12)
    unshifted = F.cross_entropy(logits.reshape(-1, V), x[:, :-1].reshape(-1))
    assert abs(unshifted.item() - manual.item()) > 1e-3  # the shift matters


# ----------------------------------------------------------------------------- BERT masking

def test_masking_follows_the_80_10_10_recipe():
    x = ids(400, 250, seed=1)
    x[:, 0], x[:, -1] = TOK.cls_id, TOK.sep_id
    x[::7, 100:110] = TOK.pad_id
    inputs, labels = ob.mask_tokens(x, TOK, rate=0.15, generator=torch.Generator().manual_seed(0))
    selected = labels != -100
    special = torch.isin(x, torch.tensor(sorted(TOK.special_ids)))
    assert not (selected & special).any(), "special tokens must never be selected"
    assert torch.equal(inputs[~selected], x[~selected]), "unselected tokens must stay"
    assert torch.equal(labels[selected], x[selected])
    n_sel, n_cand = selected.sum().item(), (~special).sum().item()
    assert n_sel / n_cand == pytest.approx(0.15, abs=0.005)
    masked = (inputs == TOK.mask_id) & selected
    changed = selected & (inputs != x) & ~masked
    kept = selected & (inputs == x)
    p_same = 1 / (V - 5)  # a random replacement can draw the original token
    assert masked.sum().item() / n_sel == pytest.approx(0.8, abs=0.01)
    assert changed.sum().item() / n_sel == pytest.approx(0.1 * (1 - p_same), abs=0.01)
    assert kept.sum().item() / n_sel == pytest.approx(0.1 + 0.1 * p_same, abs=0.01)
    assert not torch.isin(inputs[changed], torch.tensor(sorted(TOK.special_ids))).any()


def test_masking_rate_is_a_parameter():
    x = ids(200, 200, seed=2)
    _, labels = ob.mask_tokens(x, TOK, rate=0.4, generator=torch.Generator().manual_seed(0))
    assert (labels != -100).float().mean().item() == pytest.approx(0.4, abs=0.01)


def test_mlm_loss_only_on_selected_positions():
    model, x = tiny(causal=False), ids(4, 20, seed=3)
    inputs, labels = ob.mask_tokens(x, TOK, 0.3, torch.Generator().manual_seed(1))
    logits = model(inputs)[0].detach().requires_grad_()
    loss = F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    grad_per_pos = logits.grad.abs().sum(-1)  # (B, T)
    assert (grad_per_pos[labels == -100] == 0).all()
    assert (grad_per_pos[labels != -100] > 0).all()
    mine = ob.mlm_loss(model, x, TOK, 0.3, torch.Generator().manual_seed(1))
    assert mine.item() == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("rate", [0.0, 1.0, -0.1, 1.5])
def test_bad_masking_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        ob.mask_tokens(ids(2, 8), TOK, rate=rate)


def test_all_special_sequence_cannot_be_masked():
    with pytest.raises(ValueError, match="special"):
        ob.mask_tokens(torch.full((2, 3), TOK.cls_id), TOK)


# ----------------------------------------------------------------------------- prefix LM

def test_prefix_lm_mask_shape_and_extremes():
    T = 6
    assert torch.equal(ob.prefix_lm_mask(T, 0), torch.ones(T, T, dtype=torch.bool).tril())
    assert ob.prefix_lm_mask(T, T).all()
    m = ob.prefix_lm_mask(T, 3)
    expected = torch.tensor([[1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, expected)
    batched = ob.prefix_lm_mask(T, torch.tensor([0, 3, 6]))
    assert batched.shape == (3, 1, T, T)
    assert torch.equal(batched[1, 0], expected)
    with pytest.raises(ValueError, match="prefix_len"):
        ob.prefix_lm_mask(T, 7)


def test_prefix_lm_is_bidirectional_in_the_prefix_and_causal_after():
    model, x, p = tiny(causal=False), ids(1, 12, seed=4), 5
    mask = ob.prefix_lm_mask(12, p)
    base = model(x, attn_mask=mask)[0]
    late = x.clone()
    late[0, 9] = (x[0, 9] - 5 + 1) % (V - 5) + 5  # change a token after the prefix
    out = model(late, attn_mask=mask)[0]
    assert torch.allclose(out[0, :9], base[0, :9], rtol=0, atol=1e-12)  # nothing before it sees it
    assert not torch.allclose(out[0, 9], base[0, 9])
    early = x.clone()
    early[0, 4] = (x[0, 4] - 5 + 1) % (V - 5) + 5  # change the last prefix token
    out = model(early, attn_mask=mask)[0]
    assert not torch.allclose(out[0, 0], base[0, 0])  # the first position sees it: bidirectional


def test_prefix_lm_targets_drop_the_prefix():
    y = ids(2, 8)
    t = ob.prefix_lm_targets(y, torch.tensor([1, 4]))
    assert torch.equal(t[0], y[0])
    assert (t[1, :3] == -100).all() and torch.equal(t[1, 3:], y[1, 3:])


# ----------------------------------------------------------------------------- batches

class FakeData:
    tokenizer = TOK

    def __init__(self, n=500):
        self.train = ids(n, seed=5)

    def batch(self, split, batch_size, block_size, generator=None, device=None):
        ix = torch.randint(len(self.train) - block_size - 1, (batch_size,), generator=generator)
        w = self.train[ix[:, None] + torch.arange(block_size + 1)]
        return w[:, :-1], w[:, 1:]


def test_batch_fns_give_equal_token_counts():
    data = FakeData()
    x, y = ob.make_batch_fn("gpt", data, 4, 16, generator=torch.Generator().manual_seed(0))("train")
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    inp, lab = ob.make_batch_fn("bert", data, 4, 16, generator=torch.Generator().manual_seed(0))("train")
    assert inp.shape == lab.shape == (4, 16)
    assert (inp[:, 0] == TOK.cls_id).all() and (inp[:, -1] == TOK.sep_id).all()
    assert (lab[:, [0, -1]] == -100).all()
    x, y, m = ob.make_batch_fn("prefix", data, 4, 16, generator=torch.Generator().manual_seed(0))("train")
    assert x.shape == y.shape == (4, 16) and m.shape == (4, 1, 16, 16)


def test_batch_fn_bad_input():
    with pytest.raises(ValueError, match="objective must be one of"):
        ob.make_batch_fn("t5", FakeData(), 4, 16)
    with pytest.raises(ValueError, match="special tokens"):
        ob.make_batch_fn("bert", FakeData(), 4, 2)
    with pytest.raises(ValueError, match="empty"):
        ob.make_batch_fn("gpt", FakeData(n=0), 4, 16)


def test_paired_configs_have_equal_parameter_counts():
    gpt_cfg, bert_cfg = ob.paired_configs(ModelConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    assert gpt_cfg.causal and not bert_cfg.causal
    assert Transformer(gpt_cfg).num_params() == Transformer(bert_cfg).num_params()


# ----------------------------------------------------------------------------- evaluation

def test_perplexity_of_causal_model_is_exp_loss():
    model, x = tiny(), ids(3, 11)
    assert ob.perplexity(model, x) == pytest.approx(math.exp(ob.causal_lm_loss(model, x).item()), rel=1e-12)


def test_bidirectional_perplexity_uses_left_context_only():
    model, x = tiny(causal=False), ids(2, 6, seed=6)
    nll = []
    for t in range(1, 6):  # the slow way: [CLS] x_<t [MASK], nothing on the right
        inp = torch.cat([torch.full((2, 1), TOK.cls_id), x[:, :t], torch.full((2, 1), TOK.mask_id)], 1)
        nll.append(F.cross_entropy(model(inp)[0][:, -1], x[:, t], reduction="none"))
    expected = math.exp(torch.cat(nll).mean().item())
    assert ob.perplexity(model, x, TOK, chunk=3) == pytest.approx(expected, rel=1e-12)


def cloze_items(seed=7):
    x = ids(5, 12, seed=seed)
    cands = ids(5, 4, seed=seed + 1)
    return x, torch.full((5,), 6), cands


def test_cloze_left_ignores_and_mask_uses_the_right_context():
    gpt, bert = tiny(), tiny(causal=False)
    x, pos, cands = cloze_items()
    right = x.clone()
    right[:, 8:] = ids(5, 4, seed=9)
    assert torch.allclose(ob.cloze_scores(gpt, x, pos, cands, "left"),
                          ob.cloze_scores(gpt, right, pos, cands, "left"))
    assert not torch.allclose(ob.cloze_scores(bert, x, pos, cands, "mask", TOK),
                              ob.cloze_scores(bert, right, pos, cands, "mask", TOK))
    assert not torch.allclose(ob.cloze_scores(gpt, x, pos, cands, "rescore"),
                              ob.cloze_scores(gpt, right, pos, cands, "rescore"))


def test_cloze_rescore_is_the_sentence_log_likelihood_difference():
    gpt = tiny()
    x, pos, cands = cloze_items()
    scores = ob.cloze_scores(gpt, x, pos, cands, "rescore")
    for k in range(cands.size(1)):
        filled = x.clone()
        filled[:, 6] = cands[:, k]
        ll = -F.cross_entropy(gpt(filled[:, :-1])[0].transpose(1, 2), filled[:, 1:], reduction="none").sum(1)
        prefix = -F.cross_entropy(gpt(filled[:, :-1])[0][:, :5].transpose(1, 2), filled[:, 1:6],
                                  reduction="none").sum(1)
        assert torch.allclose(scores[:, k], ll - prefix, rtol=0, atol=1e-10)
    answer = scores.argmax(1)
    assert ob.cloze_accuracy(gpt, x, pos, cands, answer, "rescore") == 1.0


def test_cloze_bad_method():
    x, pos, cands = cloze_items()
    with pytest.raises(ValueError, match="method must be one of"):
        ob.cloze_scores(tiny(), x, pos, cands, "guess")


def test_word_start_cloze_blanks_first_letters():
    chars = " abcdefghijklmnopqrstuvwxyz.\n"
    tok = SimpleNamespace(encode=lambda s: [chars.index(c) + 5 for c in s],
                          decode=lambda t: "".join(chars[i - 5] for i in t))
    text = "the python language has simple words and many more words in the manual. " * 20
    items = bvg.make_word_start_cloze(torch.tensor(tok.encode(text)), tok, 30, 16, 4,
                                     generator=torch.Generator().manual_seed(0))
    x, pos, cands, answer = items["x"], items["pos"], items["candidates"], items["answer"]
    assert x.shape == (30, 16) and cands.shape == (30, 4)
    for i in range(30):
        blank = tok.decode([x[i, pos[i]]])
        assert tok.decode([x[i, pos[i] - 1]]) == " " and blank.isalpha()
        assert cands[i, answer[i]] == x[i, pos[i]]
        assert len(set(cands[i].tolist())) == 4


def test_generate_both_ways():
    gpt, bert = tiny(), tiny(causal=False)
    prompt = ids(2, 5)
    out = ob.generate(gpt, prompt, 6)
    assert torch.equal(out, gpt.generate(prompt, 6, temperature=0))
    out = ob.generate(bert, prompt, 6, TOK, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 11) and torch.equal(out[:, :5], prompt)
    assert not torch.isin(out[:, 5:], torch.tensor(sorted(TOK.special_ids))).any()


def test_real_word_rate_and_vocabulary():
    voc = bvg.vocabulary("The return statement returns a value.")
    assert bvg.real_word_rate("return the value xq zzk", voc) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="empty"):
        bvg.vocabulary("")


def test_linear_probe_separates_separable_features_only():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (400,), generator=g)
    feats = torch.randn(400, 16, generator=g)
    separable = feats + 3.0 * y[:, None] * torch.eye(16)[0]
    assert ob.linear_probe(separable[:300], y[:300], separable[300:], y[300:]) > 0.9
    assert ob.linear_probe(feats[:300], y[:300], feats[300:], y[300:]) < 0.7  # labels unrelated to features
    with pytest.raises(ValueError, match="non-empty"):
        ob.linear_probe(feats[:0], y[:0], feats, y)


def test_features_pooling():
    model, x = tiny(causal=False), ids(3, 7)
    h = model.hidden_states(x)
    assert torch.allclose(ob.features(model, x, "mean"), h.mean(1))
    assert torch.allclose(ob.features(model, x, "last"), h[:, -1])
    with pytest.raises(ValueError, match="pool"):
        ob.features(model, x, "max")
