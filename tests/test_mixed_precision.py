"""Mixed precision: fp16 with dynamic loss scaling and bf16 autocast in the one loop; sharded mixed
precision (course ZeRO-3 with param_dtype/reduce_dtype beside FSDP2's MixedPrecisionPolicy) on 2 gloo
ranks against one process under torch.autocast.

The 16-bit tolerance (used below, derived here). bf16 keeps 8 significant bits, so rounding a value
to bf16 changes it by at most u = 2^-8 relatively (round to nearest: half an ulp of 2^-7). The
sharded runs compute with bf16 parameters and bf16 activations everywhere; autocast computes
matmuls from bf16-rounded inputs too, but keeps fp32 parameters for everything else and runs
LayerNorm, softmax and cross-entropy in fp32. The two therefore differ by the roundings only the
pure-bf16 run makes: per block 8 (each LayerNorm's output and its gain/bias, 2 x 2; the attention
softmax; the two residual sums; the GELU output), and 6 outside the blocks (the token and position
embedding tables, their sum, the final LayerNorm's output and gain/bias, the loss value):
k = 8·n_layer + 6. To first order in u,
relative errors of successive roundings add (each op here maps a relative perturbation ε of its
input to ≲ ε of its output: LayerNorm rescales, residual sums and softmax are contractions), so the
loss differs by at most k·u relatively and a gradient, which runs the same path forward and back,
by at most 2·k·u in norm. With n_layer = 2: 8.6 % and 17.2 %. Loose (the errors are signed and
mostly cancel; measured ~0.3 %), but any real bug (a gradient not averaged over 2 ranks: 100 %, a
rank's shard missing: >= 50 %) is far outside it.
"""
import math

import pytest
import torch

from course.data import load_dataset
from course.model import ModelConfig, Transformer
from course.parallel import launch, mp_experiments as mp
from course.parallel.comm import Comm
from course.parallel.experiments import Setup
from course.parallel.zero import shard
from course.train import TrainConfig, train

U_BF16 = 2.0 ** -8
SETUP = Setup(steps=3, data="text", grad_clip=None)  # no clipping: ZeRO sums the norm in fp64, FSDP2 in fp32
K = 8 * SETUP.n_layer + 6  # 16-bit roundings only the pure-bf16 forward makes (module docstring)


@pytest.fixture(scope="module")
def two_ranks():
    return launch.run(mp.check_all, 2, SETUP, timeout=300).values


@pytest.fixture(scope="module")
def reference():
    return mp.autocast_step(SETUP, torch.bfloat16)


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k] ** 2).sum()) for k in b))


def test_gloo_runs_16_bit_collectives(two_ranks):
    # rank r sends r+1: sums 3.0 and gathered 1.0, 2.0 are exact in 16 bits, so equality is exact
    for dtype, got in two_ranks[0]["gloo"].items():
        assert got["all_reduce"] == (getattr(torch, dtype.split(".")[1]), [3.0] * 4), dtype
        assert got["all_gather"][1] == [1.0] * 4 + [2.0] * 4, dtype
        assert got["reduce_scatter"][1] == [3.0] * 4, dtype


def test_zero3_equals_fsdp2_bit_for_bit(two_ranks):
    # the same design: the same bf16 casts, matmuls and fp32 reduce-scatter (a sum of 2 values and a
    # division by 2 are each exactly rounded and order-free), the same AdamW: identical bits
    z, f = two_ranks[0]["runs"]["zero3"], two_ranks[0]["runs"]["fsdp2"]
    assert z["loss0"] == f["loss0"] and z["losses"] == f["losses"]
    for name in f["grads0"]:
        assert torch.equal(z["grads0"][name], f["grads0"][name]), name
        assert torch.equal(z["params"][name], f["params"][name]), name
    assert z["master_dtype"] == f["master_dtype"] == {"torch.float32"}  # fp32 master shards
    other = two_ranks[1]["runs"]["zero3"]  # every rank holds the same whole model
    assert all(torch.equal(z["params"][n], other["params"][n]) for n in z["params"])


@pytest.mark.parametrize("strategy", mp.STRATEGIES)
def test_sharded_bf16_matches_one_process_autocast(two_ranks, reference, strategy):
    run = two_ranks[0]["runs"][strategy]
    assert abs(run["loss0"] - reference["loss0"]) <= K * U_BF16 * reference["loss0"]
    assert _rel(run["grads0"], reference["grads0"]) <= 2 * K * U_BF16
    assert all(math.isfinite(v) for v in run["losses"])


def _tiny(seed=0):
    torch.manual_seed(seed)
    data = load_dataset("char")
    model = Transformer(ModelConfig.gpt(n_layer=1, n_head=2, n_embd=32, block_size=16,
                                        vocab_size=data.tokenizer.vocab_size))
    g = torch.Generator().manual_seed(seed)
    return model, lambda split: data.batch(split, 4, 16, generator=g)


def _cfg(**kw):
    return TrainConfig(**{"max_steps": 6, "warmup_steps": 1, "eval_interval": 6, "eval_iters": 1,
                          "progress": False, **kw})


def test_fp16_with_loss_scaling_trains_with_fp32_master_weights():
    model, batch = _tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    hist = train(model, batch, _cfg(autocast_dtype=torch.float16), scaler=scaler)
    assert hist.skipped == [] and all(math.isfinite(v) for v in hist.train_loss)
    assert hist.train_loss[-1] < hist.train_loss[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights
    assert scaler.get_scale() == 2.0 ** 10 * 2 ** 3  # 6 clean steps, growth x2 every 2 steps


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    model, batch = _tiny()
    before = [p.detach().clone() for p in model.parameters()]
    # 2^40 times any gradient is far above fp16's largest value (65504): the scaled backward overflows
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40, growth_interval=1000)
    hist = train(model, batch, _cfg(max_steps=2, autocast_dtype=torch.float16), scaler=scaler)
    assert hist.skipped == [0, 1]  # on_nonfinite="raise" is not triggered: an overflow is expected
    assert scaler.get_scale() == 2.0 ** 38
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no update applied


def test_bf16_autocast_follows_fp32():
    runs = {}
    for dtype in (None, torch.bfloat16):
        model, batch = _tiny()
        runs[dtype] = train(model, batch, _cfg(autocast_dtype=dtype))
    # step 0 has identical parameters: the loss differs only by autocast's roundings, bounded as in the
    # module docstring by k·u with k counting them: per block the 4 matmuls' weights and outputs (8), the
    # inputs of qkv and fc (2, from fp32 LayerNorms), the attention output and GELU's output (2); lm_head's
    # input, weight and output (3). 1 layer: k = 12 + 3
    k = 12 * 1 + 3
    assert abs(runs[None].train_loss[0] - runs[torch.bfloat16].train_loss[0]) <= k * U_BF16 * runs[None].train_loss[0]


def test_shard_dtype_bad_inputs():
    with pytest.raises(ValueError, match="param_dtype"):
        shard(_tiny()[0], Comm(), stage=3, param_dtype="bf16")
    with pytest.raises(ValueError, match="stage=3"):
        shard(_tiny()[0], Comm(), stage=2, param_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="reduce_dtype"):
        shard(_tiny()[0], Comm(), stage=3, reduce_dtype=torch.int32)
    with pytest.raises(ValueError, match="strategy"):
        mp.shard_mixed(_tiny()[0], Comm(), "ddp", torch.bfloat16, torch.float32)
