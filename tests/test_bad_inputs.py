"""Bad input gets a clear error: the exception type and a message that names the parameter (or value).

One table per module: (label, callable, exception type, regex the message must match). Each case is
an input a learner could plausibly pass; the regex checks that the message says which parameter and
what is allowed, not just that something failed.
"""
import math

import pytest
import torch

from course import costs, objectives as ob
from course.attention import self_attention, softmax
from course.data import BPETokenizer, CharTokenizer, load_dataset, train_val_split
from course.device import pick_device, profile
from course.lessons.recompute import parse_policy
from course.measure import time_it
from course.model import ModelConfig, Transformer, causal_mask
from course.parallel.comm import Comm
from course.parallel.data_parallel import DataParallel, shard_batch
from course.parallel.experiments import Setup
from course.parallel.mesh import Mesh
from course.parallelize import Plan, parallelize
from course.recompute import apply_policy, plan as recompute_plan, segments_for
from course.sparse import BlockSparseAttention, bigbird, block_sparse_attention, make_pattern, sliding_window
from course.train import TrainConfig, lr_at, train
from course.viz import attention_grid, plot_attention

CFG = ModelConfig.gpt(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8)
MODEL = Transformer(CFG)
TOK = CharTokenizer("abc")
X = torch.randint(0, 32, (2, 8))
Q = torch.randn(1, 2, 8, 4)

CASES = [
    # ---- course.model
    ("vocab_size 0", lambda: ModelConfig(vocab_size=0), ValueError, "vocab_size"),
    ("n_layer float", lambda: ModelConfig(n_layer=2.0), ValueError, "n_layer"),
    ("n_head bool", lambda: ModelConfig(n_head=True), ValueError, "n_head"),
    ("n_embd not divisible", lambda: ModelConfig(n_embd=30, n_head=4), ValueError, r"n_embd \(30\).*n_head \(4\)"),
    ("dropout 1", lambda: ModelConfig(dropout=1.0), ValueError, "dropout"),
    ("dropout negative", lambda: ModelConfig(dropout=-0.1), ValueError, "dropout"),
    ("token id >= vocab", lambda: MODEL(torch.full((1, 4), 32)), ValueError, r"outside \[0, vocab_size=32\)"),
    ("negative token id", lambda: MODEL(torch.full((1, 4), -1)), ValueError, "token ids in"),
    ("float token ids", lambda: MODEL(torch.zeros(1, 4)), TypeError, "integer token ids"),
    ("bool token ids", lambda: MODEL(torch.zeros(1, 4, dtype=torch.bool)), TypeError, "integer token ids"),
    ("1-D input", lambda: MODEL(torch.zeros(4, dtype=torch.long)), ValueError, r"\(batch, seq_len\)"),
    ("3-D input", lambda: MODEL(torch.zeros(1, 2, 4, dtype=torch.long)), ValueError, r"\(batch, seq_len\)"),
    ("empty input", lambda: MODEL(torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    ("list input", lambda: MODEL([[1, 2]]), TypeError, "torch.Tensor"),
    ("sequence too long", lambda: MODEL(torch.zeros(1, 9, dtype=torch.long)), ValueError, "block_size=8"),
    ("targets wrong shape", lambda: MODEL(X, X[:, :4]), ValueError, "targets"),
    ("mask not bool", lambda: MODEL(X, attn_mask=torch.ones(8, 8)), TypeError, "attn_mask must be a bool"),
    ("mask wrong shape", lambda: MODEL(X, attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "attn_mask of shape"),
    ("generate negative tokens", lambda: MODEL.generate(X[:, :2], -3), ValueError, "max_new_tokens"),
    ("generate float tokens", lambda: MODEL.generate(X[:, :2], 2.5), ValueError, "max_new_tokens"),
    ("generate negative temperature", lambda: MODEL.generate(X[:, :2], 2, temperature=-1), ValueError, "temperature"),
    ("generate nan temperature", lambda: MODEL.generate(X[:, :2], 2, temperature=float("nan")), ValueError, "temperature"),
    ("generate top_k 0", lambda: MODEL.generate(X[:, :2], 2, top_k=0), ValueError, "top_k"),
    ("generate bad ids", lambda: MODEL.generate(torch.full((1, 2), 99), 2), ValueError, "vocab_size"),
    ("generate with BERT", lambda: Transformer(ModelConfig.bert(**{**CFG.__dict__, "causal": False, "mlm_head": True})).generate(X, 1),
     ValueError, "causal"),
    ("causal_mask T 0", lambda: causal_mask(0), ValueError, "T must be a positive integer"),
    ("causal_mask S float", lambda: causal_mask(3, 2.0), ValueError, "S must be"),
    # ---- course.train
    ("lr inf", lambda: TrainConfig(lr=float("inf")), ValueError, "lr must be a finite number > 0"),
    ("lr nan", lambda: TrainConfig(lr=float("nan")), ValueError, "lr"),
    ("lr 0", lambda: TrainConfig(lr=0), ValueError, "lr"),
    ("lr negative", lambda: TrainConfig(lr=-1e-3), ValueError, "lr"),
    ("min_lr negative", lambda: TrainConfig(min_lr=-1e-4), ValueError, "min_lr"),
    ("min_lr above lr", lambda: TrainConfig(lr=1e-3, min_lr=1e-2), ValueError, "min_lr"),
    ("weight_decay negative", lambda: TrainConfig(weight_decay=-0.1), ValueError, "weight_decay"),
    ("weight_decay inf", lambda: TrainConfig(weight_decay=float("inf")), ValueError, "weight_decay"),
    ("betas out of range", lambda: TrainConfig(betas=(0.9, 1.0)), ValueError, "betas"),
    ("betas one number", lambda: TrainConfig(betas=0.9), ValueError, "betas"),
    ("grad_clip 0", lambda: TrainConfig(grad_clip=0), ValueError, "grad_clip"),
    ("grad_clip nan", lambda: TrainConfig(grad_clip=float("nan")), ValueError, "grad_clip"),
    ("max_steps negative", lambda: TrainConfig(max_steps=-2), ValueError, "max_steps"),
    ("max_steps float", lambda: TrainConfig(max_steps=10.0), ValueError, "max_steps"),
    ("grad_accum 0", lambda: TrainConfig(grad_accum=0), ValueError, "grad_accum"),
    ("warmup negative", lambda: TrainConfig(warmup_steps=-1), ValueError, "warmup_steps"),
    ("warmup longer than training", lambda: TrainConfig(max_steps=10, warmup_steps=20), ValueError, "warmup_steps"),
    ("eval_iters 0", lambda: TrainConfig(eval_iters=0), ValueError, "eval_iters"),
    ("seed negative", lambda: TrainConfig(seed=-1), ValueError, "seed"),
    ("autocast float64", lambda: TrainConfig(autocast_dtype=torch.float64), ValueError, "autocast_dtype"),
    ("on_nonfinite unknown", lambda: TrainConfig(on_nonfinite="ignore"), ValueError, "on_nonfinite"),
    ("train with a dict config", lambda: train(MODEL, lambda s: (X, X), {"lr": 1e-3}), TypeError, "cfg must be a TrainConfig"),
    ("NaN weights trained on", lambda: train(_nan_model(), lambda s: (X, X), TrainConfig(max_steps=2, warmup_steps=0,
                                                                                        progress=False)),
     FloatingPointError, "at step 0"),
    # ---- course.data
    ("encode bytes", lambda: TOK.encode(b"abc"), TypeError, "text must be a str"),
    ("encode None", lambda: TOK.encode(None), TypeError, "text must be a str"),
    ("BPE encode bytes", lambda: BPETokenizer([]).encode(b"abc"), TypeError, "text must be a str"),
    ("decode unknown id", lambda: TOK.decode([999]), ValueError, "id 999"),
    ("decode negative id", lambda: TOK.decode([-1]), ValueError, "id -1"),
    ("char train empty", lambda: CharTokenizer.train(""), ValueError, "non-empty"),
    ("BPE vocab too small", lambda: BPETokenizer.train("abc abc", vocab_size=100), ValueError, "vocab_size"),
    ("BPE vocab float", lambda: BPETokenizer.train("abc abc", vocab_size=300.5), ValueError, "vocab_size"),
    ("unknown tokenizer", lambda: load_dataset("word"), ValueError, "tokenizer"),
    ("unknown source", lambda: load_dataset("char", "wiki"), ValueError, "source"),
    ("val_fraction 0", lambda: train_val_split(["a\n\nb"], 0.0), ValueError, "val_fraction"),
    ("batch split unknown", lambda: load_dataset("char").batch("test", 2, 8), ValueError, "split"),
    ("batch size 0", lambda: load_dataset("char").batch("train", 0, 8), ValueError, "batch_size"),
    ("batch size float", lambda: load_dataset("char").batch("train", 2.0, 8), ValueError, "batch_size"),
    ("block size huge", lambda: load_dataset("char").batch("val", 2, 10**8), ValueError, "block_size"),
    # ---- course.objectives
    ("mask rate 0", lambda: ob.mask_tokens(X, _tok32(), rate=0.0), ValueError, "rate"),
    ("mask rate 1.5", lambda: ob.mask_tokens(X, _tok32(), rate=1.5), ValueError, "rate"),
    ("prefix longer than T", lambda: ob.prefix_lm_targets(X, 9), ValueError, "prefix_len"),
    ("prefix negative", lambda: ob.prefix_lm_targets(X, -1), ValueError, "prefix_len"),
    ("prefix mask too long", lambda: ob.prefix_lm_mask(4, 5), ValueError, "prefix_len"),
    ("causal targets short", lambda: ob.causal_lm_targets(torch.zeros(2, 1, dtype=torch.long)), ValueError, "T\\+1"),
    ("unknown objective", lambda: ob.make_batch_fn("t5", load_dataset("char"), 2, 8), ValueError, "objective"),
    ("bert block too short", lambda: ob.make_batch_fn("bert", load_dataset("char"), 2, 2), ValueError, "block_size"),
    ("cloze unknown method", lambda: ob.cloze_scores(MODEL, X, torch.ones(2, dtype=torch.long), X[:, :2], "guess"),
     ValueError, "method"),
    ("perplexity BERT without tok", lambda: ob.perplexity(Transformer(CFG.replace(causal=False)), X), ValueError, "tok"),
    ("probe negative ridge", lambda: ob.linear_probe(torch.ones(2, 3), torch.zeros(2, dtype=torch.long),
                                                     torch.ones(2, 3), torch.zeros(2, dtype=torch.long), ridge=-1),
     ValueError, "ridge"),
    ("features unknown pool", lambda: ob.features(MODEL, X, pool="max"), ValueError, "pool"),
    # ---- course.attention
    ("self_attention 3-D", lambda: self_attention(Q[0], Q[0], Q[0]), ValueError, r"\(B, nh, T, hs\)"),
    ("self_attention mismatched heads", lambda: self_attention(Q, torch.randn(1, 3, 8, 4), torch.randn(1, 3, 8, 4)),
     ValueError, "q, k, v"),
    ("self_attention mismatched dtypes", lambda: self_attention(Q, Q.double(), Q), ValueError, "dtype"),
    ("softmax of ints", lambda: softmax(torch.ones(3, dtype=torch.long)), TypeError, "floating"),
    # ---- course.sparse
    ("block_size 0", lambda: block_sparse_attention(Q, Q, Q, torch.ones(8, 8, dtype=torch.bool), 0), ValueError, "block_size"),
    ("q/k/v dtype mismatch", lambda: block_sparse_attention(Q, Q.double(), Q, torch.ones(1, 2, 2, dtype=torch.bool), 4),
     ValueError, "dtype"),
    ("layout not bool", lambda: block_sparse_attention(Q, Q, Q, torch.ones(2, 2), 4), ValueError, "layout must be a bool"),
    ("layout wrong size", lambda: block_sparse_attention(Q, Q, Q, torch.ones(3, 3, dtype=torch.bool), 4), ValueError,
     "layout of 2 blocks"),
    ("layout head count", lambda: block_sparse_attention(Q, Q, Q, torch.ones(3, 2, 2, dtype=torch.bool), 4), ValueError,
     "heads"),
    ("dropout_p 1", lambda: block_sparse_attention(Q, Q, Q, torch.ones(2, 2, dtype=torch.bool), 4, dropout_p=1.0),
     ValueError, "dropout_p"),
    ("pattern heads vs model", lambda: _sparse_model_heads(), ValueError, "heads"),
    ("unknown pattern", lambda: make_pattern("diagonal", 64, 16), ValueError, "name must be one of"),
    ("window too large", lambda: sliding_window(64, 64, 16), ValueError, "window"),
    ("bigbird too short", lambda: bigbird(32, block_size=16, n_random_blocks=5), ValueError, "window_blocks"),
    ("pattern layout not tensor", lambda: BlockSparseAttention("bigbird"), ValueError, "pattern must be"),
    ("layout without block size", lambda: BlockSparseAttention(torch.ones(2, 2, dtype=torch.bool)), ValueError,
     "block_size is required"),
    # ---- course.costs
    ("activation bytes negative s", lambda: costs.layer_activation_bytes(-128, 1, 64, 4), ValueError, "s must be"),
    ("activation bytes zero heads", lambda: costs.layer_activation_bytes(128, 1, 64, 0), ValueError, "a must be"),
    ("activation bytes float batch", lambda: costs.layer_activation_bytes(128, 1.5, 64, 4), ValueError, "b must be"),
    ("activation bytes unknown core", lambda: costs.layer_activation_bytes(128, 1, 64, 4, core="flash2"), ValueError, "core"),
    ("korthikanti unknown", lambda: costs.korthikanti_layer_bytes(128, 1, 64, 4, "half"), ValueError, "recompute"),
    ("korthikanti flops negative", lambda: costs.korthikanti_flops(128, 1, -64, 2, 100), ValueError, "h must be"),
    ("model state precision", lambda: costs.model_state_bytes(1e9, "fp8"), ValueError, "precision"),
    ("model state stage", lambda: costs.model_state_bytes(1e9, "mixed", 4), ValueError, "stage"),
    ("model state world 0", lambda: costs.model_state_bytes(1e9, "mixed", 1, 0), ValueError, "world"),
    ("model state params nan", lambda: costs.model_state_bytes(float("nan")), ValueError, "n_params"),
    ("ring unknown op", lambda: costs.ring_bytes("gossip", 10, 2), ValueError, "op must be"),
    ("ring negative bytes", lambda: costs.ring_bytes("all_reduce", -1, 2), ValueError, "nbytes"),
    ("flops per token 0 layers", lambda: costs.flops_per_token(10, 0, 8, 8), ValueError, "n_layer"),
    ("gpu days utilisation", lambda: costs.gpu_days(1e20, 1e14, utilisation=1.5), ValueError, "utilisation"),
    ("score bytes 0 heads", lambda: costs.score_matrix_bytes(128, 0), ValueError, "n_head"),
    # ---- course.recompute
    ("unknown policy", lambda: apply_policy(Transformer(CFG), "half"), ValueError, "policy must be one of"),
    ("every-k without k", lambda: segments_for("every-k", 4), ValueError, "k must be"),
    ("k with full", lambda: segments_for("full", 4, 2), ValueError, "k is only used"),
    ("policy spec k not int", lambda: parse_policy("every-k:x"), ValueError, "positive integer k"),
    ("policy spec empty", lambda: parse_policy(""), ValueError, "policy spec"),
    ("planner negative layers", lambda: recompute_plan(-1, 64, 4, 128, 1), ValueError, "n_layer"),
    ("planner bad k", lambda: recompute_plan(4, 64, 4, 128, 1, "every-k", k=9), ValueError, "k must be"),
    # ---- course.parallelize, course.parallel
    ("plan shard and DP", lambda: Plan(shard="zero2", data_parallel="ddp"), ValueError, "shard='zero2'"),
    ("plan unknown shard", lambda: Plan(shard="zero4"), ValueError, "Plan.shard"),
    ("plan unknown DP", lambda: Plan(data_parallel="horovod"), ValueError, "Plan.data_parallel"),
    ("plan attention not callable", lambda: Plan(attention="sparse"), ValueError, "Plan.attention"),
    ("parallelize with a dict", lambda: parallelize(Transformer(CFG), {"shard": "zero3"}), TypeError, "plan must be"),
    ("bucket_mb 0", lambda: DataParallel(Transformer(CFG), Comm(), bucket_mb=0), ValueError, "bucket_mb"),
    ("bucket_mb nan", lambda: DataParallel(Transformer(CFG), Comm(), bucket_mb=float("nan")), ValueError, "bucket_mb"),
    ("shard batch too small", lambda: shard_batch(torch.zeros(2, 3), 0, 4), ValueError, "larger than the batch"),
    ("shard batch indivisible", lambda: shard_batch(torch.zeros(6, 3), 0, 4), ValueError, "divisible"),
    ("mesh size mismatch", lambda: Mesh(world_size=8, data=3, tensor=2), ValueError, r"data=3 x tensor=2 = 6 ranks.*8"),
    ("mesh zero dim", lambda: Mesh(data=0), ValueError, "data=0"),
    ("mesh no dims", lambda: Mesh(world_size=2), ValueError, "at least one dimension"),
    ("mesh unknown dim", lambda: Mesh(data=2, tensor=2).groups("pipe"), ValueError, "unknown mesh dimension 'pipe'"),
    ("mesh tensor across nodes", lambda: Mesh(tensor=4, data=2, gpus_per_node=4).check_within_node("tensor"), ValueError,
     "tensor groups span nodes"),
    ("mesh rank out of range", lambda: Mesh(data=2).coords(2), ValueError, "rank must be"),
    ("setup unknown data", lambda: Setup(data="txt"), ValueError, "Setup.data"),
    ("setup negative steps", lambda: Setup(steps=-2), ValueError, "Setup.steps"),
    ("setup unknown dtype", lambda: Setup(dtype="float16"), ValueError, "Setup.dtype"),
    ("setup micro batches", lambda: Setup(batch_size=6, micro_batches=4), ValueError, "micro_batches"),
    # ---- course.device, course.measure, course.viz
    ("unknown device", lambda: pick_device("tpu"), ValueError, "device must be one of"),
    ("unknown profile", lambda: profile("laptop"), ValueError, "profile must be one of"),
    ("time_it repeats 0", lambda: time_it(lambda: None, repeats=0), ValueError, "repeats"),
    ("time_it warmup negative", lambda: time_it(lambda: None, warmup=-1), ValueError, "warmup"),
    ("plot_attention not square", lambda: plot_attention(torch.ones(3, 4)), ValueError, "square"),
    ("attention_grid 3-D", lambda: attention_grid(torch.ones(2, 3, 3)), ValueError, "layers, heads"),
    ("plot_attention token count", lambda: plot_attention(torch.ones(3, 3), tokens=["a"]), ValueError, "tokens has 1"),
]

if not torch.cuda.is_available():
    CASES.append(("cuda profile on a CPU machine", lambda: profile(device="cuda"), ValueError, "CUDA"))


def _nan_model():
    torch.manual_seed(0)
    m = Transformer(CFG)
    with torch.no_grad():
        m.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    return m


def _tok32():
    from types import SimpleNamespace
    return SimpleNamespace(vocab_size=32, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4, special_ids=frozenset(range(5)))


def _sparse_model_heads():
    from course.model import set_attention
    m = Transformer(CFG.replace(block_size=32))
    set_attention(m, lambda i: BlockSparseAttention(bigbird(32, block_size=8, n_random_blocks=0, n_heads=3)))
    m(torch.zeros(1, 32, dtype=torch.long))


def test_there_are_at_least_100_cases():
    assert len(CASES) >= 100


@pytest.mark.parametrize("label,fn,exc,match", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(label, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_lr_schedule_never_negative():
    cfg = TrainConfig(max_steps=50, warmup_steps=5, lr=1e-3, min_lr=0.0)
    assert all(lr_at(s, cfg) >= 0 for s in range(60))
    assert not math.isnan(lr_at(10**6, cfg))


def test_skip_policy_trains_on_after_a_non_finite_step():
    """on_nonfinite='skip' records the step and leaves the parameters as they were."""
    model = _nan_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hist = train(model, lambda s: (X, X), TrainConfig(max_steps=2, warmup_steps=0, progress=False, on_nonfinite="skip",
                                                       eval_interval=100, eval_iters=1))
    assert hist.skipped == [0, 1]
    for n, p in model.named_parameters():  # no update was applied (NaN compared as NaN)
        assert torch.equal(torch.nan_to_num(p, nan=7.0), torch.nan_to_num(before[n], nan=7.0)), n
