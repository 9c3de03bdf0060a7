import math

import pytest
import torch
import torch.nn.functional as F

from course.model import (MatmulAttention, ModelConfig, SDPAttention, Transformer, attention_maps,
                          attention_layers, set_attention)

SMALL = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32)


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **kw}))


def test_shapes_and_loss_at_init_is_near_uniform():
    model = make()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.3  # small init: predictions close to uniform


def test_causal_future_token_cannot_change_past_outputs():
    model = make().double().eval()  # float64: the claim is exact independence, so 1e-12 is rounding only
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_bidirectional_model_sees_the_future():
    model = make(causal=False, mlm_head=True).eval()
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 50
    assert not torch.allclose(model(idx)[0][:, :15], model(changed)[0][:, :15], atol=1e-4)


def test_same_seed_same_model_and_outputs():
    idx = torch.randint(0, 50, (2, 10))
    a, b = make(seed=3), make(seed=3)
    assert torch.equal(a(idx)[0], b(idx)[0])
    assert not torch.equal(a(idx)[0], make(seed=4)(idx)[0])


def test_gpt2_init_scales_residual_projections():
    model = make(n_layer=8, n_embd=64)
    std = model.blocks[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.002
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("causal", [True, False])
def test_manual_attention_equals_sdpa(causal):
    q, k, v = torch.randn(3, 2, 4, 9, 8, dtype=torch.float64).unbind(0)
    mask = torch.rand(9, 9) > 0.3
    mask |= torch.eye(9, dtype=torch.bool)  # every query keeps at least itself
    for m in (None, mask):
        ours = MatmulAttention()(q, k, v, causal=causal, attn_mask=m)
        ref = SDPAttention()(q, k, v, causal=causal, attn_mask=m)
        assert torch.allclose(ours, ref, atol=1e-12)
    expect = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.allclose(MatmulAttention()(q, k, v, causal=causal), expect, atol=1e-12)


def test_set_attention_swaps_cores_and_keeps_outputs():
    model = make().double().eval()  # float64: the two cores compute the same function
    idx = torch.randint(0, 50, (2, 12))
    before = model(idx)[0]
    set_attention(model, lambda i: MatmulAttention())
    assert all(isinstance(l.core, MatmulAttention) for l in attention_layers(model))
    assert torch.allclose(model(idx)[0], before, rtol=1e-10, atol=1e-12)


def test_attention_maps_shape_rows_sum_to_one_and_causal():
    model = make()
    maps = attention_maps(model, torch.randint(0, 50, (1, 10)))
    assert maps.shape == (2, 1, 4, 10, 10)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 1, 4, 10))
    assert maps.triu(1).abs().max() == 0
    assert all(isinstance(l.core, SDPAttention) for l in attention_layers(model))  # cores restored


def test_generate_is_seeded_and_respects_block_size():
    model = make()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 40, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 40, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 41) and torch.equal(a, b)
    greedy = model.generate(idx, 5, temperature=0)
    assert torch.equal(greedy, model.generate(idx, 5, temperature=0))


@pytest.mark.parametrize("field,value", [("n_head", 0), ("n_embd", -4), ("vocab_size", 2.5),
                                         ("dropout", 1.0), ("block_size", 0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, field: value})


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(**{**SMALL, "n_embd": 30, "n_head": 4})


def test_too_long_sequence_and_bad_generation_args():
    model = make()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="top_k"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_k=0)
    with pytest.raises(ValueError, match="causal"):
        make(causal=False).generate(torch.zeros(1, 1, dtype=torch.long), 2)


def test_flops_per_token_matches_6n_plus_attention():
    model = make()
    n = model.num_params()
    assert model.flops_per_token(16) == 6 * n + 12 * 2 * 32 * 16
    assert n == sum(p.numel() for p in model.parameters()) - 32 * 32
