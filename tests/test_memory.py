"""Memory accounting: saved tensors and live tensors agree with each other and with the analytic model."""
import math

import pytest
import torch

from course.recompute import apply_policy
from course.costs import (core_attention_layer_bytes, head_activation_bytes, korthikanti_flops,
                          korthikanti_layer_bytes, layer_activation_bytes, model_state_bytes, selective_layer_bytes)
from course.measure import LiveTensors, measure_step, saved_tensors
from course.recompute import plan
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention

V = 64


def make(core, dropout, dtype=torch.float32, n_layer=2, n_head=4, n_embd=40, T=24):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.gpt(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=T, vocab_size=V,
                                    dropout=dropout)).to(dtype)
    if core == "matmul":
        set_attention(m, lambda i: MatmulAttention())
    return m


CONFIGS = [  # core, dropout, dtype, (B, T, C, heads)
    ("sdpa", 0.0, torch.float32, (2, 24, 40, 4)),
    ("sdpa", 0.1, torch.float32, (3, 16, 48, 6)),
    ("matmul", 0.0, torch.float32, (2, 32, 32, 2)),
    ("matmul", 0.1, torch.float32, (2, 24, 40, 4)),
    ("sdpa", 0.0, torch.bfloat16, (2, 24, 40, 4)),
    ("sdpa", 0.1, torch.bfloat16, (2, 16, 64, 4)),
    ("matmul", 0.1, torch.bfloat16, (2, 24, 40, 4)),
]


@pytest.mark.parametrize("core,dropout,dtype,shape", CONFIGS)
def test_analytic_matches_measured_saved_bytes(core, dropout, dtype, shape):
    B, T, C, H = shape
    m = make(core, dropout, dtype, n_head=H, n_embd=C, T=T)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    report, _ = saved_tensors(m, lambda: m(x, y)[1])
    e = torch.finfo(dtype).bits // 8
    layer = sum(layer_activation_bytes(T, B, C, H, bytes_per_el=e, core=core, dropout=dropout > 0).values())
    for i in range(2):
        assert abs(report.under(f"blocks.{i}") - layer) <= 0.02 * layer
    whole = 2 * layer + head_activation_bytes(T, B, C, V, bytes_per_el=e, dropout=dropout > 0)
    assert abs(report.total - whole) <= 0.02 * whole


def test_shared_storage_counted_once_and_labels():
    B, T, C, H = 2, 24, 40, 4
    m = make("sdpa", 0.0)
    x = torch.randint(0, V, (B, T))
    report, _ = saved_tensors(m, lambda: m(x, x)[1])
    core = [t for t in report.tensors if t.module == "blocks.0.attn.core"]
    # q, k, v are three views of one c_attn output: one storage of 3*B*T*C floats, two zero entries
    assert sorted(t.nbytes for t in core if t.shape == (B, H, T, C // H))[:2] == [0, 0]
    assert sum(t.nbytes for t in core) == 4 * (3 * B * T * C + B * T * C + B * H * T)
    ops = report.by_op()
    assert {"addmm", "gelu", "native_layer_norm", "scaled_dot_product_flash_attention_for_cpu"} <= set(ops)
    assert sum(ops.values()) == report.total == sum(report.by_module().values())
    assert report.by_module(depth=2)["blocks.1"] == report.under("blocks.1")
    assert report.by_module()["blocks.0.mlp.gelu"] == 4 * 4 * B * T * C  # GELU keeps its input


def test_live_tensors_follow_allocation_and_free():
    with LiveTensors() as live:
        a = torch.empty(1000)  # 4000 bytes
        b = a.view(10, 100)  # same storage: not counted again
        c = torch.empty(250)
        del c
        assert live.current == 4000 and live.peak == 5000
        del a, b
        assert live.current == 0
    assert live.timeline == [4000, 4000, 5000]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_live_and_saved_accounting_agree(dropout):
    """Live bytes after forward = saved tensors - the (pre-registered) batch ids + logits + loss."""
    m = make("sdpa", dropout)
    x, y = torch.randint(0, V, (3, 24)), torch.randint(0, V, (3, 24))
    step = measure_step(m, (x, y))
    report, _ = saved_tensors(m, lambda: m(x, y)[1])
    assert step.activations == report.total - x.nbytes - y.nbytes + 3 * 24 * V * 4 + 4
    assert step.at_peak["weights"] == sum(p.nbytes for p in m.parameters())
    assert step.peak >= step.activations + step.at_peak["weights"]


def test_measure_step_with_optimizer_and_full_recompute():
    m = apply_policy(make("sdpa", 0.0, n_layer=4), "full")
    opt = torch.optim.AdamW(m.parameters())
    x = torch.randint(0, V, (2, 24))
    m(x, x)[1].backward()
    opt.step()
    step = measure_step(m, (x, x), opt)
    n, count = sum(p.numel() for p in m.parameters()), len(list(m.parameters()))
    assert step.at_peak["optimizer state"] == 8 * n + 4 * count  # AdamW m and v in fp32, a step counter each
    kept = 4 * 2 * 24 * 40 * 4 + head_activation_bytes(24, 2, 40, V) - 2 * 24 * 8 * 2 + 2 * 24 * V * 4 + 4
    assert abs(step.activations - kept) <= 0.02 * kept  # full: only the 4 block inputs remain per layer


def test_selective_analytic_matches_measurement():
    B, T, C, H = 2, 24, 40, 4
    x = torch.randint(0, V, (B, T))
    none = measure_step(make("sdpa", 0.0), (x, x)).activations
    sel = measure_step(apply_policy(make("sdpa", 0.0), "selective"), (x, x)).activations
    layer = sum(layer_activation_bytes(T, B, C, H).values())
    expect = 2 * (layer - selective_layer_bytes(T, B, C, H))
    assert abs((none - sel) - expect) <= 0.02 * expect


@pytest.mark.parametrize("core,dropout", [("matmul", 0.0), ("matmul", 0.1), ("sdpa", 0.0)])
def test_core_attention_analytic_matches_measurement(core, dropout):
    """Korthikanti's selective recomputation drops exactly the attention core's s*s tensors (none when fused)."""
    B, T, C, H = 2, 24, 40, 4
    x = torch.randint(0, V, (B, T))
    none = measure_step(make(core, dropout), (x, x)).activations
    kept = measure_step(apply_policy(make(core, dropout), "core-attention"), (x, x)).activations
    kw = dict(core=core, dropout=dropout > 0)
    expect = 2 * (sum(layer_activation_bytes(T, B, C, H, **kw).values()) - core_attention_layer_bytes(T, B, C, H, **kw))
    assert abs((none - kept) - expect) <= 0.02 * max(expect, 1)
    if core == "matmul":  # the dropped bytes are the s*s terms: scores/softmax (+ dropout mask and output)
        assert expect == 2 * (H * T * T * B * 4 * (3 if dropout else 1) + T * T)  # 2 layers


def test_korthikanti_formulas_reproduce_published_gpt3_figures():
    s, b, h, a, L, vocab = 2048, 1, 12288, 96, 96, 51200
    full = korthikanti_layer_bytes(s, b, h, a, "none")
    assert full == s * b * h * (34 + 5 * a * s // h)
    saved = 1 - korthikanti_layer_bytes(s, b, h, a, "selective") / full
    assert saved == pytest.approx(0.70, abs=0.005)  # paper: ~70% of activation memory
    overhead = korthikanti_flops(s, b, h, L, vocab, "selective") / korthikanti_flops(s, b, h, L, vocab) - 1
    assert overhead == pytest.approx(0.027, abs=0.0005)  # paper: 2.7% for GPT-3
    mtnlg = korthikanti_flops(s, b, 20480, 105, vocab, "selective") / korthikanti_flops(s, b, 20480, 105, vocab)
    assert mtnlg - 1 == pytest.approx(0.016, abs=0.0005)  # paper: 1.6% for MT-NLG 530B
    # our block, written-out core, 16-bit, CUDA (1-byte masks): exactly 34 sbh + 5 as^2 b + small terms
    ours = layer_activation_bytes(s, b, h, a, bytes_per_el=2, core="matmul", dropout=True, device="cuda")
    assert sum(ours.values()) - full == 2 * 2 * s * b * 4 + s * s  # LayerNorm mean/rstd and the causal mask


def test_model_state_and_planner():
    assert model_state_bytes(1000, "mixed")["total"] == 16000
    assert model_state_bytes(1000, "fp32")["total"] == 16000
    p = {pol: plan(96, 12288, 96, 2048, 1, pol, k=4 if pol == "every-k" else None)
         for pol in ("none", "full", "every-k", "sqrt", "selective", "core-attention")}
    assert p["none"]["params"] == pytest.approx(174.6e9, rel=0.01)  # GPT-3 175B
    assert p["none"]["weights"] + p["none"]["gradients"] + p["none"]["optimizer state"] == pytest.approx(
        16 * p["none"]["params"] / 2**30)
    acts = {k: v["activations peak"] for k, v in p.items()}
    assert acts["full"] < acts["sqrt"] < acts["every-k"] < acts["none"]
    assert p["full"]["extra compute"] == pytest.approx(1 / 3) and p["none"]["extra compute"] == 0
    assert p["sqrt"]["activations kept"] * 2**30 == math.ceil(96 / 10) * 2048 * 12288 * 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(policy="half"), "policy must be one of"),
    (dict(policy="every-k", k=0), "k must be an integer with 1 <= k <= n_layer=4"),
    (dict(policy="every-k", k=9), "k must be an integer"),
    (dict(seq_len=0), "seq_len must be a positive integer"),
    (dict(precision="fp8"), "precision must be one of"),
    (dict(core="flash"), "core must be 'sdpa' or 'matmul'"),
])
def test_planner_bad_input(kwargs, match):
    args = dict(n_layer=4, n_embd=64, n_head=4, seq_len=128, batch=2)
    with pytest.raises(ValueError, match=match):
        plan(**{**args, **kwargs})
