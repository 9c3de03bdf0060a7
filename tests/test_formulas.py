"""The formulas the lessons show, checked against a measurement or a published table (never themselves).

FLOPs are counted by PyTorch's FlopCounterMode (2·m·n·k per matmul, forward and backward as they run);
bytes by course.measure's trackers; published numbers are the papers' own.
"""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from course import costs
from course.lessons.attention import score_matrix_cost
from course.measure import measure_step
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention
from course.recompute import apply_policy, plan
from course.sparse import BlockSparseAttention, random_blocks, block_sparse_attention
from course.sparse.cost import attention_cost


def _count_step_flops(model, x) -> int:
    with FlopCounterMode(display=False) as fc:
        _, loss = model(x, x)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def _written_out(cfg):
    torch.manual_seed(0)
    m = Transformer(cfg)
    return set_attention(m, lambda i: MatmulAttention())  # its matmuls are counted like any other


def test_gpt3_training_compute_is_6ND():
    """Brown et al. 2020, Table D.1: 3.14e23 FLOPs for 174.6B parameters and 300B tokens."""
    g = costs.GPT3_175B
    assert 6 * g["params"] * g["tokens"] == pytest.approx(g["train_flops"], rel=0.005)  # published to 3 digits


def test_flops_per_token_against_counted_flops():
    """6N + 12·L·h·T (PaLM appendix B) against the FLOPs a training step really runs. N counts every
    non-embedding parameter; biases and LayerNorm gains do no matmul, so the formula is above the
    count by exactly 6 x those parameters x tokens, and otherwise equal."""
    cfg = ModelConfig.gpt(n_layer=3, n_head=2, n_embd=32, vocab_size=64, block_size=16)
    model = _written_out(cfg)
    B, T = 3, 16
    counted = _count_step_flops(model, torch.randint(0, 64, (B, T)))
    no_matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() < 2)
    assert model.flops_per_token(T) * B * T - counted == 6 * no_matmul * B * T


def _count_forward_flops(model, x) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x, x)
    return fc.get_total_flops()


def test_full_recomputation_adds_one_forward_of_the_blocks():
    """plan()'s extra compute of full recomputation (1/3 of a step: backward costs two forwards; Korthikanti
    et al.'s 96/72 = 4/3) against counted FLOPs. PyTorch's non-reentrant checkpoint stops recomputing as
    soon as it has every tensor backward needs, so the last matmul of each block (the MLP's c_proj,
    whose output nobody saved) is not run again: the counted extra is one forward of the blocks minus
    that matmul, below plan's count, which is the textbook upper bound."""
    cfg = ModelConfig.gpt(n_layer=4, n_head=2, n_embd=64, vocab_size=64, block_size=32)
    x = torch.randint(0, 64, (2, 32))
    base = _count_step_flops(_written_out(cfg), x)
    full = _count_step_flops(apply_policy(_written_out(cfg), "full"), x)
    fwd = _count_forward_flops(_written_out(cfg), x)
    block_fwd = fwd - _count_forward_flops(_written_out(cfg.replace(n_layer=3)), x)  # one block's forward
    last_matmul = 2 * 2 * 32 * (4 * 64) * 64  # mlp.c_proj forward: 2 * tokens * 4C * C
    assert full - base == 4 * (block_fwd - last_matmul)
    assert base == 3 * fwd  # backward of every matmul is two matmuls of the same size
    extra = plan(4, 64, 2, 32, 2, "full", vocab=64)["extra compute"]
    assert extra == pytest.approx(1 / 3, rel=1e-12)
    assert (full - base) / base < extra * 4 * block_fwd / fwd  # below the textbook count, as explained


def test_sqrt_segments_keep_about_2_sqrt_n_layers():
    """Chen et al. 2016 §3: ceil(sqrt n)-block segments peak at about 2·sqrt(n) layers of activations."""
    n = 16
    cfg = ModelConfig.gpt(n_layer=n, n_head=2, n_embd=32, vocab_size=64, block_size=32)
    x = torch.randint(0, 64, (4, 32))
    torch.manual_seed(0)
    sqrt = measure_step(apply_policy(Transformer(cfg), "sqrt"), (x, x))
    layer = sum(costs.layer_activation_bytes(32, 4, 32, 2).values())
    peak_layers = sqrt.at_peak["activations & temporaries"] / layer
    assert peak_layers <= 2 * math.sqrt(n)
    assert peak_layers >= math.sqrt(n)  # one whole segment is alive while it is recomputed


def test_score_matrix_bytes_against_the_measured_matrix():
    rows = score_matrix_cost([32, 64], n_head=3, head_dim=8, repeats=1)
    for r in rows:
        assert r["score_bytes"] == costs.score_matrix_bytes(r["T"], 3, bytes_per_el=4)


def test_attention_pair_flops_against_counted_flops():
    """12·n·d (forward 4nd, backward 8nd) for the block-sparse kernel on a layout with the same number
    of kept blocks in every row (so no padding slots): counted FLOPs equal the cost model exactly."""
    p = random_blocks(128, n_random=2, block_size=16, n_heads=2, seed=3)
    q, k, v = (torch.randn(1, 2, 128, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        block_sparse_attention(q, k, v, p.layout, 16).sum().backward()
    assert fc.get_total_flops() == attention_cost(p, n_heads=2, head_dim=8).sparse_flops


def test_ring_bytes_match_the_zero_paper():
    """Rajbhandari et al. 2020 §7: DP and ZeRO-1/2 move 2Ψ per step, ZeRO-3 3Ψ (large N)."""
    psi, N = 1e9, 1024
    assert costs.ring_bytes("all_reduce", psi, N) == pytest.approx(2 * psi, rel=1e-3)
    zero3 = 2 * costs.ring_bytes("all_gather", psi, N) + costs.ring_bytes("reduce_scatter", psi, N)
    assert zero3 == pytest.approx(3 * psi, rel=1e-3)


def test_korthikanti_gpt3_published_numbers():
    """Korthikanti et al. 2022, Table 4 / §5: selective recomputation saves about 70% of activation memory
    for 2.7% more FLOPs at GPT-3 175B (s 2048, h 12288, a 96, L 96, V 51200)."""
    s, b, h, a, L, V = 2048, 1, 12288, 96, 96, 51200
    saving = 1 - costs.korthikanti_layer_bytes(s, b, h, a, "selective") / costs.korthikanti_layer_bytes(s, b, h, a)
    overhead = costs.korthikanti_flops(s, b, h, L, V, "selective") / costs.korthikanti_flops(s, b, h, L, V) - 1
    assert saving == pytest.approx(0.70, abs=0.01) and overhead == pytest.approx(0.027, abs=0.001)


def test_block_sparse_core_pattern_heads_shared():
    """A shared (1-head) pattern serves any head count."""
    core = BlockSparseAttention(random_blocks(64, n_random=1, block_size=16, seed=0))
    q = torch.randn(1, 4, 64, 8)
    assert core(q, q, q, causal=False).shape == q.shape
