"""Tensor and sequence parallelism on real gloo ranks vs the unsplit model, in float64.

One launch per world size carries every distributed check (course.parallel.tp_experiments.tp_checks):
spawning ranks costs seconds, a check on this tiny model milliseconds. The 4-rank launch skips
PyTorch's DTensor comparison, whose first use alone costs seconds.
"""
import math

import pytest
import torch

from course.costs import (korthikanti_tp_layer_bytes, layer_activation_bytes, tensor_parallel_bytes,
                          tensor_parallel_layer_bytes)
from course.model import ModelConfig, Transformer
from course.parallel import launch
from course.parallel.experiments import Setup
from course.parallel.mesh import Mesh
from course.parallel.tensor import apply_tensor_parallel, check_divisible
from course.parallel.tp_experiments import tp_checks
from course.parallelize import Plan

# float64 (eps 2.2e-16): splitting a matmul only reorders sums of at most a few hundred O(1) terms here,
# so results agree to ~1e-13 even after 3 AdamW steps (Adam keeps relative errors relative); a missing,
# doubled or misplaced reduction is off by O(1e-3) or more.
TOL = 1e-10
SETUP = Setup(n_head=4, dtype="float64")  # 2 layers, width 32, vocabulary 64, 8 sequences of 16 tokens
# 4 ranks: 8 heads, 2 per rank. With one head per rank, SDPA's CPU math path (dropout > 0) keeps v as a
# view of the whole c_attn output, 2·sbh more than course.costs.layer_activation_bytes counts (it
# assumes copies of q, k, v, true for 2+ heads); the unsplit model with n_head=1 shows the same gap.
SETUPS = {2: SETUP, 4: Setup(n_head=8, dtype="float64")}


@pytest.fixture(scope="module")
def two_ranks():
    return launch.run(tp_checks, 2, SETUP, timeout=300).values


@pytest.fixture(scope="module")
def four_ranks():
    return launch.run(tp_checks, 4, SETUPS[4], False, False, timeout=300).values


@pytest.fixture(params=[2, 4])
def ranks(request, two_ranks, four_ranks):
    return request.param, {2: two_ranks, 4: four_ranks}[request.param]


@pytest.mark.parametrize("kind", ["tensor", "sequence"])
def test_block_equals_unsplit_block(ranks, kind):
    t, values = ranks
    for r in values:
        block = r[kind]["block"]
        assert max(block["output"], block["input_grad"], block["weight_grads"]) < TOL, (t, kind, block)


def test_collectives_counted_per_block(ranks):
    t, values = ranks
    for r in values:
        tp, sp = r["tensor"]["block"], r["sequence"]["block"]
        assert tp["forward"]["calls"] == {"all_reduce": 2} and tp["backward"]["calls"] == {"all_reduce": 2}
        assert sp["forward"]["calls"] == {"all_gather": 2, "reduce_scatter": 2}
        assert sp["backward"]["calls"] == {"all_gather": 4, "reduce_scatter": 2}  # 2 of them re-gather inputs
        assert sum(name.endswith("(re-gather)") for name in sp["backward"]["names"]) == 2
        b, s, h = SETUP.batch_size, SETUP.block_size, SETUP.n_embd
        formula = tensor_parallel_bytes(b, s, h, t, bytes_per_el=8)
        assert tp["forward"]["bytes"] + tp["backward"]["bytes"] == formula["total"] == 8 * 8 * b * s * h * (t - 1) / t
        sp_formula = tensor_parallel_bytes(b, s, h, t, bytes_per_el=8, sequence_parallel=True)
        assert sp["forward"]["bytes"] + sp["backward"]["bytes"] == sp_formula["total"]
        assert sp_formula["total"] - sp_formula["regather"] == formula["total"]  # same bytes as all-reduces
        assert sp["param_grad_calls"] == {"all_reduce": 6}  # ln_1, ln_2 weight+bias, 2 row-parallel biases
        assert tp["param_grad_calls"] == {}


@pytest.mark.parametrize("kind", ["tensor", "sequence"])
def test_model_vocab_parallel_loss_and_gradients(ranks, kind):
    t, values = ranks
    L = SETUP.n_layer
    for r in values:
        m = r[kind]["model"]
        assert abs(m["loss"] - m["reference_loss"]) < TOL and m["logits"] < TOL and m["grads"] < TOL, m
        assert m["logits_shape"] == [SETUP.batch_size, SETUP.block_size, SETUP.vocab_size // t]  # never gathered
        if kind == "tensor":  # 2 per block + the embedding's; backward: 2 per block + lm_head's input
            assert m["forward_calls"] == {"all_reduce": 2 * L + 1, "all_gather": 1}  # all-gather: 2 numbers a token
            assert m["backward_calls"] == {"all_reduce": 2 * L + 1}


def test_ranks_agree_on_loss(ranks):
    t, values = ranks
    assert len({r["tensor"]["model"]["loss"] for r in values}) == 1


@pytest.mark.parametrize("kind", ["tensor", "sequence"])
def test_training_equals_one_process(ranks, kind):
    t, values = ranks
    for r in values:
        tr = r[kind]["train"]
        assert tr["max_abs_diff"] < TOL
        assert tr["losses"] == pytest.approx(tr["reference_losses"], abs=TOL)
        assert tr["grad_norms"] == pytest.approx(tr["reference_grad_norms"], abs=TOL)  # clipping sees all shards


def test_training_with_full_recomputation(two_ranks):
    for r in two_ranks:
        assert r["tensor"]["train_recompute"]["max_abs_diff"] < TOL


@pytest.mark.parametrize("kind", ["tensor", "sequence"])
def test_pytorch_dtensor_gives_the_same_block(two_ranks, kind):
    for r in two_ranks:
        d = r[kind]["dtensor"]
        assert max(d["output"], d["input_grad"], d["weight_grads"]) < TOL, d


@pytest.mark.parametrize("dropout_key, dropout", [("memory", False), ("memory_dropout", True)])
def test_activation_bytes_per_rank_equal_formula(ranks, dropout_key, dropout):
    t, values = ranks
    setup = SETUPS[t]
    s, b, h, a = setup.block_size, setup.batch_size, setup.n_embd, setup.n_head
    kw = dict(bytes_per_el=4, dropout=dropout, device="cpu")  # measured in float32 on the CPU
    for r in values:
        mem = r[dropout_key]
        assert mem["whole"]["block"] == sum(layer_activation_bytes(s, b, h, a, **kw).values())
        assert mem["tensor"]["block"] == sum(tensor_parallel_layer_bytes(s, b, h, a, t, **kw).values())
        sp = tensor_parallel_layer_bytes(s, b, h, a, t, sequence_parallel=True, **kw)
        assert mem["sequence"]["block"] == sum(sp.values()) == mem["whole"]["block"] // t
        for part in ("blocks.0.ln_1", "blocks.0.ln_2", "blocks.0.attn.resid_dropout", "blocks.0.mlp.dropout"):
            whole, split = mem["tensor"]["by_module"].get(part, 0), mem["sequence"]["by_module"].get(part, 0)
            assert split * t == whole, (part, whole, split)  # LayerNorm and dropout: 1/t of tensor parallel's


def test_formula_equals_korthikanti_table_2():
    """Our per-part bytes in the paper's setting (16-bit, written-out attention, 1-byte masks) at GPT-3 size
    equal Table 2 of Korthikanti et al. 2022 plus the two terms the paper drops: the LayerNorm statistics
    (2 LayerNorms x mean, rstd x sb, fp32) and the boolean causal mask (s², the same on every rank)."""
    s, b, h, a = 2048, 1, 12288, 96
    for t in (1, 2, 8):
        for sp in (False, True):
            ours = sum(tensor_parallel_layer_bytes(s, b, h, a, t, sequence_parallel=sp, bytes_per_el=2, core="matmul",
                                                   dropout=True, device="cuda").values())
            dropped = 2 * 2 * s * b * 4 // (t if sp else 1) + s * s
            assert ours - dropped == pytest.approx(korthikanti_tp_layer_bytes(s, b, h, a, t, sp), rel=1e-12)


def test_shards_are_columns_rows_and_heads(two_ranks):
    C, V = SETUP.n_embd, SETUP.vocab_size
    for rank, r in enumerate(two_ranks):
        shards = {p["name"]: p for p in r["shards"]}
        assert shards["blocks.0.attn.c_attn.weight"]["shape"] == [3 * C // 2, C]
        assert shards["blocks.0.attn.c_proj.weight"]["shape"] == [C, C // 2]
        assert shards["blocks.0.mlp.c_fc.weight"]["shape"] == [4 * C // 2, C]
        assert shards["blocks.0.mlp.c_proj.weight"]["shape"] == [C, 4 * C // 2]
        assert shards["wte.weight"]["shape"] == [V // 2, C]
        rows = shards["blocks.0.attn.c_attn.weight"]["indices"]  # this rank's half of q's, k's and v's heads
        assert rows == [i for g in range(3) for i in range(g * C + rank * C // 2, g * C + (rank + 1) * C // 2)]
        assert shards["blocks.0.ln_1.weight"]["dim"] is None  # LayerNorms stay whole


def test_sequence_parallel_rejects_indivisible_length(ranks):
    t, values = ranks
    for r in values:
        msg = r["bad_inputs"]["sequence_length"]
        assert f"sequence length {t + 1}" in msg and f"tensor-parallel size {t}" in msg


def test_bad_sizes_name_the_numbers_and_a_fix():
    model = Transformer(ModelConfig.gpt(n_layer=1, n_head=4, n_embd=16, vocab_size=64))
    with pytest.raises(ValueError, match=r"n_head=4 is not divisible by the tensor-parallel size 3.*\[2, 4\]"):
        apply_tensor_parallel(model, Mesh(tensor=3))
    odd_vocab = Transformer(ModelConfig.gpt(n_layer=1, n_head=4, n_embd=16, vocab_size=65))
    with pytest.raises(ValueError, match=r"vocab_size=65 is not divisible .* 2.*vocab_size=66"):
        apply_tensor_parallel(odd_vocab, Mesh(tensor=2))
    with pytest.raises(ValueError, match="mesh data=2 x tensor=2 = 4 ranks, but the world has 8"):
        Mesh(world_size=8, data=2, tensor=2)
    with pytest.raises(ValueError, match="tensor groups span nodes"):  # tensor outermost: ranks 2 apart
        apply_tensor_parallel(model, Mesh(tensor=4, data=2, gpus_per_node=4))
    with pytest.raises(ValueError, match="tensor dimension has 4 ranks but this process's group has 1"):
        apply_tensor_parallel(model, Mesh(data=2, tensor=4, gpus_per_node=4))  # fits a node; no process group here
    with pytest.raises(ValueError, match="sequence_parallel=True .* needs Plan.tensor_parallel=True"):
        Plan(sequence_parallel=True)
    with pytest.raises(ValueError, match="tensor_parallel=True with Plan.data_parallel='naive'"):
        Plan(tensor_parallel=True, data_parallel="naive")
    with pytest.raises(TypeError, match="needs a course.model.Transformer"):
        apply_tensor_parallel(torch.nn.Linear(2, 2), Mesh(tensor=1))
    check_divisible("n_head", 12, 4)  # divisible: no error
    assert math.prod(Mesh(world_size=8, data=2, tensor=4).shape) == 8
