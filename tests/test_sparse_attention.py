"""Sparse attention (issue 4): every pattern vs dense attention with the equivalent mask, hand-worked
layouts, the model plug-in, FlexAttention's BlockMask, costs, memory tracker, bad input."""
import math
import warnings

import pytest
import torch

from course.sparse import (BlockSparseAttention, alternating_dense_banded, bigbird, block_sparse_attention,
                              causal, coverage_layout, dense, dilated, fixed, global_tokens, longformer,
                              make_pattern, random_blocks, sliding_window, strided, PATTERNS)
from course.sparse.cost import attention_cost
from course.sparse.flex import block_mask, flex_available, flex_forward
from course.measure import LiveTensors as LiveMemory
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention

H = 3


def reference(q, k, v, mask):
    """Dense attention with a boolean mask; queries with no key output 0 (FlexAttention's convention)."""
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    s = s.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    return torch.nan_to_num(torch.softmax(s, -1)) * has @ v


def builders(T, bs):
    return {
        "dense": lambda c: dense(T, bs, causal=c),
        "causal": lambda c: causal(T, bs),
        "sliding_window": lambda c: sliding_window(T, 5, bs, causal=c),
        "dilated": lambda c: dilated(T, 3, 2, bs, causal=c),
        "global_tokens": lambda c: global_tokens(T, 3, bs, causal=c),
        "random_blocks": lambda c: random_blocks(T, 2, bs, n_heads=H, seed=3, causal=c),
        "bigbird": lambda c: bigbird(T, bs, 3, 2, 1, n_heads=H, seed=1, causal=c),
        "longformer": lambda c: longformer(T, 4, 2, bs, causal=c),
        "strided": lambda c: strided(T, 7, bs),
        "fixed": lambda c: fixed(T, 8, 3, bs),
        "strided_split": lambda c: strided(T, 6, bs, split=True, n_heads=H),
        "fixed_split": lambda c: fixed(T, 8, 2, bs, split=True, n_heads=H),
    }


@pytest.mark.parametrize("T", [48, 45])  # whole blocks (fast path) and padding to whole blocks
@pytest.mark.parametrize("name", list(builders(48, 8)))
def test_every_pattern_matches_dense_reference(name, T):
    torch.manual_seed(0)
    for model_causal in (False, True):
        p = builders(T, 8)[name](model_causal)
        assert torch.equal(p.layout, coverage_layout(p.mask_mod, T, 8, p.n_heads))  # layout = element mask's tiles
        c = model_causal or p.causal
        mask = p.dense_mask(H) & (torch.ones(T, T, dtype=torch.bool).tril() if c else True)
        q, k, v = (torch.randn(2, H, T, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
        out = block_sparse_attention(q, k, v, p.layout, 8, causal=c, mask_mod=None if p.block_exact else p.mask_mod)
        ref = reference(q, k, v, mask)
        g = torch.randn_like(ref)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_dense_rows_and_uneven_row_lengths_are_exact():
    # BigBird's global rows take the dense path; rows next to globals have fewer blocks (padding slots)
    T, bs = 256, 16
    p = bigbird(T, bs, 3, 2, 3, n_heads=2, seed=5)
    from course.sparse import plan
    pl = plan(p.layout, 2, False)
    assert pl["dense_blocks"] is not None and pl["masked"].numel() > 0
    q, k, v = (torch.randn(1, 2, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = block_sparse_attention(q, k, v, p.layout, bs)
    ref = reference(q, k, v, p.dense_mask(2))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    gs = torch.autograd.grad(out.square().sum(), (q, k, v))
    gr = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, b in zip(gs, gr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_sliding_window_layout_by_hand():
    p = sliding_window(8, 1, block_size=2)  # |i-j| <= 1 touches the neighbouring blocks only
    assert torch.equal(p.layout[0], M([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]))
    assert p.dense_mask()[0, 3].nonzero().flatten().tolist() == [2, 3, 4]


def test_strided_by_hand():
    # Child et al.: A1 = {max(0, i-l) .. i}, A2 = {j: (i-j) mod l = 0}, j <= i; l = 2
    m = strided(6, 2, block_size=1).dense_mask()[0]
    assert m[5].nonzero().flatten().tolist() == [1, 3, 4, 5]
    assert m[2].nonzero().flatten().tolist() == [0, 1, 2]
    assert not m.triu(1).any()
    split = strided(6, 2, block_size=1, split=True, n_heads=2).dense_mask()
    assert split[0, 5].nonzero().flatten().tolist() == [3, 4, 5]  # A1 only
    assert split[1, 5].nonzero().flatten().tolist() == [1, 3, 5]  # A2 only


def test_fixed_by_hand():
    # A1 = same stride block, A2 = {j: j mod l in {l-c .. l-1}}, j <= i; l = 3, c = 1
    m = fixed(6, 3, 1, block_size=1).dense_mask()[0]
    assert [m[i].nonzero().flatten().tolist() for i in range(6)] == [[0], [0, 1], [0, 1, 2], [2, 3], [2, 3, 4],
                                                                      [2, 3, 4, 5]]


def test_dilated_and_global_by_hand():
    m = dilated(9, 2, 2, block_size=1).dense_mask()[0]
    assert m[4].nonzero().flatten().tolist() == [0, 2, 4, 6, 8]
    assert m[0].nonzero().flatten().tolist() == [0, 2, 4]
    g = global_tokens(6, 2, block_size=1).dense_mask()[0]
    assert g[:2].all() and g[:, :2].all() and g[2:, 2:].sum() == 0


def test_bigbird_layout_by_hand():
    p = bigbird(32, block_size=4, window_blocks=3, n_global_blocks=2, n_random_blocks=0)  # nb = 8
    idx = torch.arange(8)
    expect = (idx.view(-1, 1) - idx.view(1, -1)).abs() <= 1
    expect[[0, 7]] = True
    expect[:, [0, 7]] = True
    assert torch.equal(p.layout[0], expect)
    pc = bigbird(32, block_size=4, n_global_blocks=2, n_random_blocks=0, causal=True)  # causal: first two global
    assert torch.equal(pc.layout[0, :, :2], torch.ones(8, 2, dtype=torch.bool).tril())


def test_dense_mask_of_tiles_equals_mask_mod():
    p = bigbird(200, 16, n_random_blocks=2, n_heads=2, causal=True)
    h, i, j = torch.arange(2).view(2, 1, 1), torch.arange(200).view(1, -1, 1), torch.arange(200).view(1, 1, -1)
    assert torch.equal(p.dense_mask(), p.mask_mod(0, h, i, j))


def test_bigbird_random_blocks_are_seeded_per_head_and_outside_window():
    a = bigbird(1024, n_heads=4, seed=0)  # defaults: block 64, 3-block window, 2 global, 3 random
    b = bigbird(1024, n_heads=4, seed=0)
    c = bigbird(1024, n_heads=4, seed=1)
    assert a.block_size == 64 and torch.equal(a.layout, b.layout) and not torch.equal(a.layout, c.layout)
    assert not torch.equal(a.layout[0], a.layout[1])  # each head draws its own
    counts = a.layout[:, 2:-2].sum(-1)  # rows away from globals: 3 window + 2 global + 3 random
    assert (counts == 8).all()
    r = random_blocks(512, 3, 64, seed=2)
    assert (r.layout.sum(-1) == 4).all()  # 3 random + itself


def test_alternating_dense_banded_like_gpt3():
    pats = alternating_dense_banded(4, 64, window=7, block_size=8)
    assert [p.name for p in pats] == ["dense causal", "sliding window 7"] * 2
    assert pats[1].causal and pats[1].dense_mask()[0, 20].nonzero().flatten().tolist() == list(range(13, 21))


@pytest.mark.parametrize("name", PATTERNS)
def test_make_pattern_builds_every_pattern(name):
    p = make_pattern(name, 512, block_size=32, window=3, n_global=1, n_random=2, n_heads=2)
    assert p.layout.shape[-1] == 16 and 0 < p.block_density() <= 1


def test_bad_input_names_the_parameter():
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(ValueError, match="block_size"):
        block_sparse_attention(q, q, q, torch.ones(4, 4, dtype=torch.bool), 32)
    with pytest.raises(ValueError, match="heads"):
        block_sparse_attention(q, q, q, torch.ones(3, 4, 4, dtype=torch.bool), 16)
    with pytest.raises(ValueError, match="window"):
        sliding_window(64, 64)
    with pytest.raises(ValueError, match="n_global"):
        global_tokens(64, 65)
    with pytest.raises(ValueError, match="n_random_blocks"):
        bigbird(512, 64, n_random_blocks=4)
    with pytest.raises(ValueError, match="n_random"):
        random_blocks(256, 4, 64)
    with pytest.raises(ValueError, match="window_blocks"):
        bigbird(1024, window_blocks=2)
    with pytest.raises(ValueError, match="name"):
        make_pattern("bigbirb", 256)
    with pytest.raises(ValueError, match="n_heads"):
        attention_cost(bigbird(1024, n_heads=3), n_heads=4)


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig.gpt(vocab_size=50, block_size=64, n_layer=2, n_head=2, n_embd=32, **kw)).double()


def test_model_with_sparse_core_equals_masked_dense_model():
    idx = torch.randint(0, 50, (2, 64))
    band = sliding_window(64, 9, block_size=16, causal=True)
    sparse = set_attention(tiny_gpt(), lambda i: BlockSparseAttention(band))
    ref = set_attention(tiny_gpt(), lambda i: MatmulAttention())
    ls, lr = sparse(idx, idx)[1], ref(idx, idx, attn_mask=band.dense_mask(2))[1]
    torch.testing.assert_close(ls, lr)
    ls.backward()
    lr.backward()
    for a, b in zip(sparse.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad)
    # a dense causal layout reproduces the unmodified model; shorter inputs use the leading blocks
    dense_model = set_attention(tiny_gpt(), lambda i: BlockSparseAttention(causal(64, 16)))
    torch.testing.assert_close(dense_model(idx[:, :40])[0], tiny_gpt()(idx[:, :40])[0])


def test_alternating_layers_and_explicit_mask_fallback():
    pats = alternating_dense_banded(2, 64, window=5, block_size=16)
    model = set_attention(tiny_gpt(), lambda i: BlockSparseAttention(pats[i]))
    idx = torch.randint(0, 50, (2, 64))
    mask = torch.ones(64, 64, dtype=torch.bool)
    torch.testing.assert_close(model(idx, attn_mask=mask)[0], model(idx)[0])  # dense fallback = block path
    from course.sparse.block_sparse import sparse_attention_maps
    maps = sparse_attention_maps(model, idx[:1])  # (L, B, H, T, T)
    assert maps.shape == (2, 1, 2, 64, 64)
    assert maps[1, 0, :, 30, :20].sum() == 0 and maps[1, 0, :, 30, 25:31].sum() > 0.99
    assert maps[0, 0, :, 30, :20].sum() > 0


def test_dropout_changes_output_and_keeps_grads_finite():
    p = bigbird(256, 16, n_random_blocks=1, n_heads=2)
    q = torch.randn(1, 2, 256, 8, requires_grad=True)
    torch.manual_seed(0)
    out = block_sparse_attention(q, q, q, p.layout, 16, dropout_p=0.5)
    assert not torch.allclose(out, block_sparse_attention(q, q, q, p.layout, 16))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.skipif(not flex_available(), reason="FlexAttention not in this torch")
def test_flex_block_mask_from_layout():
    for p in (bigbird(128, 16, 3, 1, 1, n_heads=2, causal=True), strided(120, 8, 16)):
        bm = block_mask(p)
        assert torch.equal(bm.to_dense()[0].bool().expand(2, -1, -1), p.layout.expand(2, -1, -1))
        q, k, v = (torch.randn(1, 2, p.seq_len, 8, dtype=torch.float64) for _ in range(3))  # equality: float64
        want = block_sparse_attention(q, k, v, p.layout, 16, causal=True, mask_mod=None if p.block_exact else p.mask_mod)
        with warnings.catch_warnings():  # eager flex warns that it is unfused: fine for a correctness check
            warnings.simplefilter("ignore")
            got = flex_forward(q, k, v, bm, compiled=False)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_cost_counts_tiles_and_flops():
    p = bigbird(32, block_size=4, n_random_blocks=0)
    c = attention_cost(p, n_heads=2, head_dim=8)
    tiles = int(p.layout.sum())
    assert c.sparse_entries == 2 * tiles * 16 and c.dense_entries == 2 * 32 * 32
    assert c.sparse_flops == 12 * c.sparse_entries * 8 and c.flop_ratio == pytest.approx(64 / tiles)
    assert attention_cost(dense(64, 16), 2, 8).density == 1.0
    long = [attention_cost(bigbird(T, n_heads=4), 4, 64).sparse_flops for T in (4096, 8192)]
    assert 1.9 < long[1] / long[0] < 2.2  # linear in length


def test_live_memory_tracks_creation_and_frees():
    x = torch.randn(256, 256)
    with LiveMemory() as mem:
        a = x @ x  # 256 KiB
        b = a * 2  # 256 KiB
        del a
        c = b + 1  # 256 KiB: a was freed, so 2 alive
        del b, c
    assert mem.peak == 2 * 256 * 256 * 4 and mem.current == 0


def test_explore_reports_the_cost_the_widget_shows():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from course.lessons.sparse import attention_distance, explore
    fig, cost = explore("bigbird", seq_len=512, block_size=32, window=3, n_global=1, n_random=2)
    want = attention_cost(make_pattern("bigbird", 512, 32, 3, 1, 2), 4, 64)
    assert cost.sparse_flops == want.sparse_flops and cost.density < 0.5
    plt.close(fig)
    with pytest.raises(ValueError, match="pattern"):
        explore("nope")
    eye = torch.eye(8).expand(2, 1, 3, 8, 8)  # (L, B, H, T, T): attend to self only
    assert attention_distance(eye).abs().sum() == 0
    prev = torch.eye(8).roll(-1, 1).expand(1, 1, 1, 8, 8)  # one token back (wrapping at 0)
    assert attention_distance(prev)[0, 0] == pytest.approx((7 * 1 + 7) / 8)
