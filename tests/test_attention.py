import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from course.attention import ScratchAttention, bidirectional_mask, causal_mask, self_attention, softmax
from course.lessons.attention import describe_heads, explore_attention, head_stats, loglog_slope, score_matrix_cost
from course.model import ModelConfig, Transformer, attention_maps, set_attention


def qkv(B=2, H=3, T=7, hs=8, S=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = S or T
    return (torch.randn(B, H, T, hs, generator=g), torch.randn(B, H, S, hs, generator=g),
            torch.randn(B, H, S, hs, generator=g))


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_sdpa(causal):
    q, k, v = qkv()
    out, w = self_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7))


def test_self_attention_with_user_mask_equals_sdpa():
    q, k, v = qkv(T=6)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    mask |= torch.eye(6, dtype=torch.bool)  # every row keeps one key
    out, w = self_attention(q, k, v, causal=True, attn_mask=mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask & causal_mask(6))
    torch.testing.assert_close(out, ref)
    assert (w[..., ~(mask & causal_mask(6))] == 0).all()


def test_causal_future_token_cannot_change_past():
    q, k, v = qkv(T=8)
    out1, _ = self_attention(q, k, v, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[..., 5:, :] += 10.0
    v2[..., 5:, :] -= 3.0
    out2, _ = self_attention(q, k2, v2, causal=True)
    torch.testing.assert_close(out1[..., :5, :], out2[..., :5, :])
    assert not torch.allclose(out1[..., 5:, :], out2[..., 5:, :])
    out3, _ = self_attention(q, k2, v2, causal=False)  # bidirectional: the past does see the change
    assert not torch.allclose(out1[..., :5, :], out3[..., :5, :])


def test_masks():
    m = causal_mask(4)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert bidirectional_mask(3).all() and bidirectional_mask(3).shape == (3, 3)
    with pytest.raises(ValueError, match="T"):
        causal_mask(0)


def test_softmax_is_stable_and_correct():
    s = torch.tensor([[1000.0, 1001.0, 999.0], [-2.0, 0.0, 3.0]])
    p = softmax(s)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p, torch.softmax(s, dim=-1))


def test_self_attention_rejects_bad_shapes():
    with pytest.raises(ValueError, match="q, k, v"):
        self_attention(torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4))


def tiny_model(causal=True, seed=0):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16, causal=causal))
    return model.double().eval()  # float64: equality claims hold to float64 rounding


@pytest.mark.parametrize("causal", [True, False])
def test_scratch_core_matches_default_model(causal):
    model = tiny_model(causal)
    idx = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    ref, _ = model(idx)
    set_attention(model, lambda i: ScratchAttention())
    out, _ = model(idx)
    torch.testing.assert_close(out, ref)  # float64 defaults: rtol 1e-7, atol 1e-7


def test_score_matrix_cost_bytes_are_quadratic():
    rows = score_matrix_cost([8, 16, 32], n_head=2, head_dim=4, batch=1, repeats=1)
    assert [r["T"] for r in rows] == [8, 16, 32]
    assert [r["score_bytes"] for r in rows] == [2 * T * T * 4 for T in (8, 16, 32)]
    assert all(r["seconds"] > 0 for r in rows)
    slope, _ = loglog_slope([r["T"] for r in rows], [r["score_bytes"] for r in rows])
    assert slope == pytest.approx(2.0)
    with pytest.raises(ValueError, match="seq_lens"):
        score_matrix_cost([0, 8])


def test_score_matrix_cost_restores_threads():
    before = torch.get_num_threads()
    score_matrix_cost([8], repeats=1, cpu_threads=1)
    assert torch.get_num_threads() == before


def test_loglog_slope():
    x = [1.0, 2.0, 4.0, 8.0]
    slope, intercept = loglog_slope(x, [3 * t ** 1.5 for t in x])
    assert slope == pytest.approx(1.5)
    assert math.exp(intercept) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        loglog_slope([1.0], [2.0])


def handmade_maps(T=6):
    """Layer 0: head 0 attends the previous token, head 1 the first token; layer 1: uniform causal."""
    prev = torch.zeros(T, T)
    prev[0, 0] = 1
    prev[torch.arange(1, T), torch.arange(T - 1)] = 1
    first = torch.zeros(T, T)
    first[:, 0] = 1
    uniform = causal_mask(T).float()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    return torch.stack([torch.stack([prev, first]), torch.stack([uniform, uniform])])  # (2, 2, T, T)


def test_head_stats_on_handmade_patterns():
    s = head_stats(handmade_maps())
    assert s["prev"][0, 0] == pytest.approx(1.0)
    assert s["first"][0, 1] == pytest.approx(1.0)
    assert s["distance"][0, 0] == pytest.approx(1.0)
    # uniform over i+1 keys: entropy log(i+1), mean look-back i/2, for queries i = 1..5
    assert s["entropy"][1, 0] == pytest.approx(sum(math.log(i + 1) for i in range(1, 6)) / 5, rel=1e-5)
    assert s["distance"][1, 1] == pytest.approx(sum(i / 2 for i in range(1, 6)) / 5)
    lines = describe_heads(handmade_maps())
    assert len(lines) == 4
    assert "previous-token" in lines[0] and "first-token" in lines[1] and "previous-token" not in lines[2]
    with pytest.raises(ValueError, match="maps"):
        head_stats(torch.zeros(2, 3, 4))


def char_tokenizer():
    chars = "abcdefghijklmno "
    return SimpleNamespace(encode=lambda s: [chars.index(c) for c in s], decode=lambda ids: "".join(chars[i] for i in ids))


def test_explore_attention_returns_the_model_weights():
    model, tok = tiny_model(), char_tokenizer()
    text = "abc defg"
    view = explore_attention(model, tok, text, layer=1, head=1, plot=False)
    assert view.tokens == list(text)
    idx = torch.tensor([tok.encode(text)])
    torch.testing.assert_close(view.weights, attention_maps(model, idx)[1, 0, 1])
    assert view.weights.shape == (8, 8)
    assert torch.triu(view.weights, diagonal=1).abs().max() == 0  # causal: nothing above the diagonal
    torch.testing.assert_close(view.weights.sum(-1), torch.ones(8, dtype=view.weights.dtype))
    top = view.strongest()
    assert len(top) == 8 and top[0] == ("a", "a", pytest.approx(1.0))
    assert view.ax is None


def test_explore_attention_draws_a_labelled_heatmap():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    view = explore_attention(tiny_model(causal=False), char_tokenizer(), "hello", layer=0, head=0)
    assert view.ax is not None
    assert [t.get_text() for t in view.ax.get_xticklabels()] == list("hello")
    assert "layer 0, head 0" in view.ax.get_title()
    assert (view.weights[0, 1:] > 0).all()  # bidirectional: the first token sees later ones
    plt.close("all")


@pytest.mark.parametrize("kw,match", [
    (dict(layer=2, head=0), "layer"), (dict(layer=-1, head=0), "layer"),
    (dict(layer=0, head=2), "head"), (dict(layer=0, head=0, text=""), "text"),
    (dict(layer=0, head=0, text="a" * 17), "block_size"),
])
def test_explore_attention_rejects_bad_input(kw, match):
    kw = {"text": "abc", **kw}
    with pytest.raises(ValueError, match=match):
        explore_attention(tiny_model(), char_tokenizer(), plot=False, **kw)
