"""FlashAttention-2 in plain PyTorch (issue 17): equal to SDPA and to dense masked attention in float64,
dropout equal to a dense reference with the same regenerated masks, saved bytes equal to the formula,
the model plug-in and the "flash" recomputation policy, bad input.

Tolerances: the kernel and the references compute the same exact attention in float64 and differ only
in the order of their sums (online softmax over tiles vs one softmax per row). With T <= 64 terms of
size O(1) the difference is bounded by a few hundred units of float64 roundoff (2^-53 ~ 1.1e-16):
well under 1e-12, while any algorithmic error (a missing rescale, a dropped tile) is O(1e-2) or more.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from course.costs import flash_layer_bytes, layer_activation_bytes
from course.flash import FlashAttention, _dropped, _row_keys, _threshold, computed_tiles, dropout_keep, flash_attention
from course.measure import measure_step, saved_tensors
from course.model import MatmulAttention, ModelConfig, SDPAttention, Transformer, set_attention
from course.parallelize import Plan, parallelize
from course.recompute import FlashCore, apply_policy, plan, policy_of, remove_policy
from course.sparse import BlockSparseAttention, bigbird, random_blocks, sliding_window, strided

TOL = dict(rtol=1e-12, atol=1e-12)  # float64, summation order only (module docstring)
TILES = [(16, 16), (7, 13), (64, 64), (40, 5)]  # square, ragged, one tile, more query rows than keys per tile


def reference_attention(q, k, v, causal=False, keep=None, dropout_p=0.0, seed=0):
    """Dense attention (autograd) with the kernel's dropout masks built densely by `dropout_keep`. keep: bool
    broadcastable to (B, H, T, T), True = attend; a row with no key outputs 0."""
    B, H, T, D = q.shape
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)  # (B, H, T, T)
    if causal:
        tri = torch.ones(T, T, dtype=torch.bool).tril()
        keep = tri if keep is None else keep & tri
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1))  # a row with no key: 0/0 -> 0
    if dropout_p > 0:
        p = p * dropout_keep(seed, B, H, T, dropout_p) / (1 - dropout_p)
    return p @ v  # (B, H, T, D)


def qkv(B=2, H=3, T=50, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, g)


def assert_same(a, b, inputs):
    torch.testing.assert_close(a, b, **TOL)
    for x, y in zip(grads(a, inputs), grads(b, inputs)):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bq,bk", TILES)
def test_equals_sdpa(causal, bq, bk):
    inputs = qkv(T=50)  # 50 is not a multiple of any tile size here
    out = flash_attention(*inputs, causal, block_q=bq, block_k=bk)
    assert_same(out, F.scaled_dot_product_attention(*inputs, is_causal=causal), inputs)


def test_equals_sdpa_with_attn_mask_and_scale():
    inputs = qkv(B=2, H=2, T=37)
    pad = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    pad[1, ..., 30:] = False  # the second sequence's last keys are padding
    out = flash_attention(*inputs, True, block_q=8, block_k=16, attn_mask=pad, scale=0.3)
    tri = torch.ones(37, 37, dtype=torch.bool).tril()
    assert_same(out, F.scaled_dot_product_attention(*inputs, attn_mask=pad & tri, scale=0.3), inputs)


def sparse_cases(T, bs):
    return {"bigbird": bigbird(T, bs, 1, 1, 1, n_heads=3, seed=2), "random per head": random_blocks(T, 2, bs, n_heads=3, seed=4),
            "bigbird causal": bigbird(T, bs, 1, 1, 1, causal=True), "sliding (mask_mod)": sliding_window(T, 5, bs),
            "strided (mask_mod, causal)": strided(T, 6, bs)}


@pytest.mark.parametrize("name", list(sparse_cases(45, 8)))
@pytest.mark.parametrize("T", [48, 45])  # whole tiles and a ragged last tile
def test_block_sparse_equals_dense_masked_sdpa(name, T):
    pattern = sparse_cases(T, 8)[name]
    inputs = qkv(B=2, H=3, T=T)
    mask = pattern.dense_mask(3)  # (H, T, T), causality included for causal patterns
    assert bool(mask.any(-1).all())  # every query keeps a key: SDPA is defined
    out = FlashAttention(8, 8, layout=pattern)(*inputs, causal=False)
    assert_same(out, F.scaled_dot_product_attention(*inputs, attn_mask=mask), inputs)
    kept, total = int(computed_tiles(T, 8, 8, pattern.causal, pattern.layout).sum()), math.ceil(T / 8) ** 2
    assert kept < total  # tiles outside the layout are skipped


def test_skipped_tiles_and_empty_rows():
    T, bs = 32, 8
    layout = torch.zeros(1, 4, 4, dtype=torch.bool)
    layout[0, 0, 0] = layout[0, 2, 1] = layout[0, 3, 3] = True  # query tile 1 keeps no key tile at all
    assert computed_tiles(T, bs, bs, False, layout).tolist() == layout[0].tolist()
    assert computed_tiles(T, 8, 16, True).tolist() == [[True, False], [True, False], [True, True], [True, True]]
    inputs = qkv(B=1, H=2, T=T)
    out = flash_attention(*inputs, block_q=bs, block_k=bs, layout=layout)
    keep = layout[0].repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    ref = reference_attention(*inputs, keep=keep)  # the reference outputs 0 for empty rows
    torch.testing.assert_close(out, ref, **TOL)
    assert torch.equal(out[:, :, 8:16], torch.zeros_like(out[:, :, 8:16]))
    dq, dk, dv = grads(out, inputs)
    for x, y in zip((dq, dk, dv), grads(ref, inputs)):
        torch.testing.assert_close(x, y, **TOL)
    assert torch.equal(dk[:, :, 16:24], torch.zeros_like(dk[:, :, 16:24]))  # key tile 2: attended by no query


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bq,bk", TILES)
def test_dropout_equals_dense_reference_with_the_same_masks(causal, bq, bk):
    inputs = qkv(T=50)
    out = flash_attention(*inputs, causal, block_q=bq, block_k=bk, dropout_p=0.3, seed=11)
    assert_same(out, reference_attention(*inputs, causal, dropout_p=0.3, seed=11), inputs)
    assert not torch.allclose(out, flash_attention(*inputs, causal, dropout_p=0.3, seed=12))  # another seed, other masks


def test_dropout_with_a_block_sparse_layout():
    pattern = bigbird(45, 8, 1, 1, 1, n_heads=3, seed=2)
    inputs = qkv(B=2, H=3, T=45)
    out = FlashAttention(8, 8, layout=pattern, dropout_seed=5)(*inputs, causal=True, dropout_p=0.2)
    keep = pattern.dense_mask(3)
    assert_same(out, reference_attention(*inputs, True, keep=keep, dropout_p=0.2, seed=5), inputs)


def _lowbias_python(seed, B, H, T, b, h, i, j):
    """The generator in plain Python integers (mod 2^32 / 2^64 by hand): what the int32 ops must compute."""
    M64, M32 = (1 << 64) - 1, (1 << 32) - 1

    def splitmix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)
    start = splitmix((seed * 0x9E3779B97F4A7C15) & M64)
    z = splitmix((((b * H + h) * T + i) * 0x9E3779B97F4A7C15 + start) & M64)
    k1, k2 = z & M32, z >> 32
    x = ((k1 ^ j) * 0x7FEB352D) & M32
    x = ((x ^ (x >> 15)) ^ k2) & M32
    x = (x * 0x846CA68B) & M32
    return x - (1 << 32) if x >= 1 << 31 else x  # as int32


def test_generator_is_the_documented_hash():
    """Exact: the vectorized int32/int64 ops equal the hash computed with Python integers, so the masks are the
    same on every machine (and integer products wrap as the code assumes)."""
    seed, B, H, T = 2**61 + 12345, 2, 3, 40
    k1, k2 = _row_keys(seed, B, H, T, None)
    assert k1.dtype == k2.dtype == torch.int32
    for b, h, i, j in [(0, 0, 0, 0), (1, 2, 39, 39), (1, 0, 17, 3), (0, 2, 5, 31)]:
        row = b * H + h
        want = _lowbias_python(seed, B, H, T, b, h, i, j)
        for thr in (want, want + 1):  # x < thr is False at thr = x and True at x + 1: pins x exactly
            assert bool(_dropped(k1[row:row + 1, i:i + 1], k2[row:row + 1, i:i + 1], j, j + 1, thr)) == (want < thr)


def test_dropout_masks_are_unbiased_and_uncorrelated():
    """2M draws: each rate within 6 binomial standard deviations of p or p^2 (a false alarm ~1e-9 per check)."""
    p = 0.1
    d = ~dropout_keep(3, 2, 4, 512, p)  # (2, 4, 512, 512) dropped
    checks = {"dropped": (d, p), "row neighbours": (d[..., :, 1:] & d[..., :, :-1], p * p),
              "column neighbours": (d[..., 1:, :] & d[..., :-1, :], p * p), "next head": (d[:, 1:] & d[:, :-1], p * p),
              "next sequence": (d[1:] & d[:-1], p * p), "row i, column i+1": (d[..., :-1, 1:] & d[..., 1:, :-1], p * p)}
    for name, (events, rate) in checks.items():  # independent draws: P(both dropped) = p^2
        sd = math.sqrt(rate * (1 - rate) / events.numel())
        assert abs(events.double().mean().item() - rate) < 6 * sd, name
    assert _threshold(0.0) == -2**31 and _threshold(p) == round(p * 2**32) - 2**31
    d1 = ~dropout_keep(4, 2, 4, 512, p)  # the next seed: not a shifted copy of seed 3's stream
    for shift in (0, 1, 512):
        a, b = d.reshape(-1)[shift:], d1.reshape(-1)[:d.numel() - shift]
        both = (a & b).double().mean().item()
        assert abs(both - p * p) < 6 * math.sqrt(p * p * (1 - p * p) / a.numel()), shift


def test_saved_tensors_are_q_k_v_o_and_lse():
    B, H, T, D = 2, 3, 50, 8
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    report, _ = saved_tensors(torch.nn.Module(), lambda: flash_attention(q, k, v, True, block_q=16, block_k=16,
                                                                           dropout_p=0.1))
    assert sorted(t.nbytes for t in report.tensors) == sorted([4 * B * H * T * D] * 4 + [4 * B * H * T])


@pytest.mark.parametrize("dtype,dropout", [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.1)])
def test_saved_bytes_per_layer_equal_the_formula(dtype, dropout):
    """Measured with course.measure.saved_tensors: no s*s term, at several lengths (linear in T)."""
    B, C, H = 2, 48, 4
    for T in (16, 32, 64):
        torch.manual_seed(0)
        m = Transformer(ModelConfig.gpt(n_layer=2, n_head=H, n_embd=C, block_size=T, vocab_size=64,
                                        dropout=dropout)).to(dtype)
        set_attention(m, lambda i: FlashAttention(16, 16))
        x = torch.randint(0, 64, (B, T))
        report, _ = saved_tensors(m, lambda: m(x, x)[1])
        e = torch.finfo(dtype).bits // 8
        want = sum(flash_layer_bytes(T, B, C, H, bytes_per_el=e, dropout=dropout > 0).values())
        assert report.under("blocks.0") == report.under("blocks.1") == want, T
    written = sum(layer_activation_bytes(64, B, C, H, core="matmul", dropout=True).values())
    assert written - want > 3 * H * 64 * 64 * B * 4  # what the written-out core keeps besides


def make(core=None, dropout=0.0, dtype=torch.float64, n_layer=2, T=24):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.gpt(n_layer=n_layer, n_head=2, n_embd=16, block_size=T, vocab_size=64,
                                    dropout=dropout)).to(dtype)
    if core is not None:
        set_attention(m, core)
    return m


def loss_and_grads(model, T=24):
    x = torch.randint(0, 64, (3, T), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    _, loss = model(x, x)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_model_plug_in_and_plan_equal_sdpa():
    ref_loss, ref = loss_and_grads(make())
    for model in (make(lambda i: FlashAttention(8, 16)), parallelize(make(), Plan(attention=lambda i: FlashAttention(5, 7)))):
        loss, got = loss_and_grads(model)
        torch.testing.assert_close(loss, ref_loss, **TOL)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, **TOL)


def test_flash_policy_swaps_cores_and_puts_them_back():
    m = make(lambda i: MatmulAttention())
    keys = list(m.state_dict())
    ref_loss, ref = loss_and_grads(make(lambda i: MatmulAttention()))
    apply_policy(m, "flash")
    assert policy_of(m) == "flash" and all(isinstance(b.attn.core, FlashCore) for b in m.blocks)
    assert list(m.state_dict()) == keys
    loss, got = loss_and_grads(m)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert all(torch.allclose(a, b, **TOL) for a, b in zip(got, ref))
    apply_policy(m, "full")  # another policy replaces it
    assert all(isinstance(b.attn.core, MatmulAttention) for b in m.blocks) and policy_of(m) == "full"
    remove_policy(apply_policy(m, "flash"))
    assert all(isinstance(b.attn.core, MatmulAttention) for b in m.blocks) and policy_of(m) == "none"
    assert policy_of(parallelize(make(), Plan(recompute="flash"))) == "flash"


def test_flash_policy_keeps_a_block_sparse_pattern():
    pattern = bigbird(48, 8, 1, 1, 1, n_heads=2, seed=1)
    ref_loss, ref = loss_and_grads(make(lambda i: BlockSparseAttention(pattern), T=48), T=48)
    m = apply_policy(make(lambda i: BlockSparseAttention(pattern), T=48), "flash")
    assert m.blocks[0].attn.core.flash.sparse is not None  # tiles = the pattern's blocks
    loss, got = loss_and_grads(m, T=48)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert all(torch.allclose(a, b, **TOL) for a, b in zip(got, ref))


def test_flash_policy_with_dropout_is_reproducible_and_replays_under_checkpoint():
    """dropout_seed=None draws the seed from torch's RNG: same torch seed, same run; full recomputation
    (checkpoint restores the RNG state) replays the same masks, so gradients are bitwise equal."""
    a = loss_and_grads(apply_policy(make(dropout=0.2), "flash"))
    b = loss_and_grads(apply_policy(make(dropout=0.2), "flash"))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    plain = loss_and_grads(make(dropout=0.2))
    assert not torch.allclose(a[0], plain[0])  # dropout is on (other masks than SDPA's)
    m = make(lambda i: FlashAttention(8, 8), dropout=0.2)
    ref = loss_and_grads(m)
    got = loss_and_grads(apply_policy(make(lambda i: FlashAttention(8, 8), dropout=0.2), "full"))
    assert torch.equal(got[0], ref[0]) and all(torch.equal(x, y) for x, y in zip(got[1], ref[1]))


def test_flash_policy_memory_and_planner():
    """Measured: the flash policy keeps exactly the flash formula's bytes per layer; planner agrees."""
    B, T, C, H, L = 2, 32, 32, 2, 2
    x = torch.randint(0, 64, (B, T))
    none = measure_step(make(lambda i: MatmulAttention(), dropout=0.1, dtype=torch.float32, T=T), (x, x)).activations
    flash = measure_step(apply_policy(make(lambda i: MatmulAttention(), dropout=0.1, dtype=torch.float32, T=T), "flash"),
                         (x, x)).activations
    written = sum(layer_activation_bytes(T, B, C, H, core="matmul", dropout=True).values())
    kept = sum(flash_layer_bytes(T, B, C, H, dropout=True).values())
    assert none - flash == L * (written - kept)
    p = plan(L, C, H, T, B, "flash", bytes_per_el=4, dropout=True, core="matmul", device="cpu")
    assert p["activations kept"] * 2**30 == L * kept
    assert p["extra compute"] == pytest.approx(2 * T * T * C / (3 * (24 * T * C * C + 4 * T * T * C)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_q=0), "block_q must be a positive integer"),
    (dict(block_k=-4), "block_k must be a positive integer"),
    (dict(block_q=2.5), "block_q must be a positive integer"),
    (dict(dropout_p=1.0), "dropout_p must be in"),
    (dict(layout=torch.ones(1, 3, 3, dtype=torch.bool)), "does not match the tiles"),
    (dict(layout=torch.ones(1, 4, 4)), "layout must be a bool tensor"),
    (dict(layout=torch.ones(2, 4, 4, dtype=torch.bool)), "does not match the tiles"),
    (dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), "does not broadcast"),
    (dict(attn_mask=torch.ones(32, 32)), "attn_mask must be a bool tensor"),
])
def test_bad_arguments(kwargs, match):
    q, k, v = (torch.randn(1, 3, 32, 8) for _ in range(3))
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **{"block_q": 8, "block_k": 8, **kwargs})


def test_bad_tensors_and_cores():
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        flash_attention(q, q, torch.randn(1, 2, 15, 8))
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        flash_attention(q, q, q.double())
    with pytest.raises(ValueError, match=r"\(batch, heads, seq, head_dim\)"):
        flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="block_size=8: it matches the tiles only with block_q = block_k = 8 "):
        FlashAttention(16, 16, layout=bigbird(64, 8, 1, 1, 1))
    with pytest.raises(ValueError, match="block_q must be a positive integer"):
        FlashAttention(0, 16)
    with pytest.raises(ValueError, match="exceeds the pattern's seq_len=32"):
        FlashAttention(8, 8, layout=bigbird(32, 8, 1, 1, 1))(*(torch.randn(1, 2, 40, 8) for _ in range(3)), causal=True)
    with pytest.raises(ValueError, match="no flash equivalent of attention core Linear"):
        FlashAttention.replacing(torch.nn.Linear(2, 2))
    assert isinstance(FlashAttention.replacing(SDPAttention()), FlashAttention)
