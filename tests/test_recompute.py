"""Recomputation policies: exact gradients, unchanged weights, the memory they save, bad input."""
import pytest
import torch
import torch.nn as nn

from course.lessons.recompute import measure_policies
from course.measure import measure_step
from course.model import run_blocks
from course.recompute import POLICIES, RecomputedCore, SegmentRunner, apply_policy, policy_of, remove_policy, segments_for
from course.model import MatmulAttention, ModelConfig, Transformer, set_attention

SPECS = [("full", None), ("every-k", 2), ("every-k", 3), ("sqrt", None), ("selective", None), ("core-attention", None)]


def make(core="sdpa", dropout=0.1, n_layer=4):
    torch.manual_seed(0)
    m = Transformer(ModelConfig.gpt(n_layer=n_layer, n_head=2, n_embd=32, block_size=16, vocab_size=64,
                                    dropout=dropout))
    if core == "matmul":
        set_attention(m, lambda i: MatmulAttention())
    return m


def grads(model):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 64, (3, 16), generator=g), torch.randint(0, 64, (3, 16), generator=g)
    torch.manual_seed(123)  # same dropout masks in every run
    _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("core", ["sdpa", "matmul"])
def test_every_policy_gives_the_same_gradients_with_dropout(core):
    ref_loss, ref = grads(make(core))
    assert all(g.abs().sum() > 0 for g in ref.values())
    for policy, k in SPECS:
        loss, got = grads(apply_policy(make(core), policy, k))
        assert torch.equal(loss, ref_loss), policy
        assert got.keys() == ref.keys()
        for name in ref:  # recomputation replays the same ops with the same RNG state: bitwise equal
            assert torch.equal(got[name], ref[name]), (policy, name)


def test_state_dict_unchanged_and_policy_removable():
    plain = make()
    keys = list(plain.state_dict())
    blocks = list(plain.blocks)
    ckpt = apply_policy(plain, "sqrt")
    assert isinstance(ckpt.runner, SegmentRunner) and policy_of(ckpt) == "sqrt"
    assert "segments [0-1*, 2-3*]" in repr(ckpt.runner)
    assert list(ckpt.state_dict()) == keys
    ckpt.load_state_dict(make().state_dict())  # strict: same names, same shapes
    assert type(ckpt.blocks) is nn.ModuleList and list(ckpt.blocks) == blocks  # the blocks stay blocks
    remove_policy(ckpt)
    assert ckpt.runner is run_blocks and policy_of(ckpt) == "none"
    assert list(ckpt.state_dict()) == keys


def test_core_attention_wraps_only_the_cores():
    plain = make("matmul")
    keys = list(plain.state_dict())
    m = apply_policy(make("matmul"), "core-attention")
    assert all(isinstance(b.attn.core, RecomputedCore) for b in m.blocks.children())
    assert all(isinstance(b.attn.core.core, MatmulAttention) for b in m.blocks.children())
    assert list(m.state_dict()) == keys and policy_of(m) == "core-attention" and m.runner is run_blocks
    apply_policy(m, "core-attention")  # a second policy replaces the first: no double wrapping
    assert all(isinstance(b.attn.core.core, MatmulAttention) for b in m.blocks.children())
    apply_policy(m, "full")
    assert all(isinstance(b.attn.core, MatmulAttention) for b in m.blocks.children()) and policy_of(m) == "full"
    remove_policy(m)
    assert m.runner is run_blocks and all(isinstance(b.attn.core, MatmulAttention) for b in m.blocks.children())


def test_eval_and_generate_run_without_recomputation():
    ref = make(dropout=0.0).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    for policy in ("selective", "core-attention"):
        m = apply_policy(make(dropout=0.0), policy).eval()
        assert torch.equal(m.generate(idx, 4, temperature=0), ref.generate(idx, 4, temperature=0))


def test_segments():
    assert segments_for("none", 3) == [(0, 1, False), (1, 2, False), (2, 3, False)]
    assert [c for *_, c in segments_for("every-k", 6, 3)] == [True, False, False, True, False, False]
    sq = segments_for("sqrt", 10)  # ceil(sqrt 10) = 4 blocks per segment
    assert [(a, b) for a, b, _ in sq] == [(0, 4), (4, 8), (8, 10)] and all(c for *_, c in sq)
    assert all(c for *_, c in segments_for("full", 5)) and len(segments_for("selective", 5)) == 5


def test_memory_ordering_of_policies():
    """Measured activations kept after forward (written-out attention, so selective drops the s*s terms)."""
    x = torch.randint(0, 64, (4, 16))
    acts = {}
    for policy, k in [("none", None), ("every-k", 2), ("full", None), ("selective", None), ("core-attention", None)]:
        acts[policy] = measure_step(apply_policy(make("matmul", n_layer=4), policy, k), (x, x)).activations
    assert acts["full"] < acts["every-k"] < acts["none"]
    assert acts["full"] < acts["selective"] < 0.7 * acts["none"]  # attention core and pointwise outputs dropped
    assert acts["selective"] < acts["core-attention"] < acts["none"]  # only the attention core dropped


@pytest.mark.parametrize("policy,k,match", [
    ("everything", None, "policy must be one of"),
    ("every-k", 0, "k must be an integer with 1 <= k <= n_layer=4"),
    ("every-k", 5, "k must be an integer with 1 <= k <= n_layer=4"),
    ("every-k", None, "k must be"),
    ("full", 2, "k is only used by policy 'every-k'"),
])
def test_bad_policy_arguments(policy, k, match):
    with pytest.raises(ValueError, match=match):
        apply_policy(make(), policy, k)


def test_model_without_blocks():
    with pytest.raises(ValueError, match="nn.ModuleList `blocks`"):
        apply_policy(nn.Linear(2, 2), "full")
    changed = apply_policy(make(), "sqrt")
    changed.blocks = changed.blocks[:3]  # the runner was planned for 4 blocks
    with pytest.raises(ValueError, match="planned for 4 blocks, the model now has 3"):
        changed(torch.zeros(1, 4, dtype=torch.long))
    assert "selective" in POLICIES


def test_policies_keep_gradients_exact_with_a_block_sparse_core():
    """The attention core is pluggable: recomputing a custom autograd core (chapter 03's block-sparse
    kernel) with dropout also replays exactly."""
    from course.sparse import patterns
    from course.lessons.sparse import sparse_gpt

    cfg = ModelConfig.gpt(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=64, dropout=0.1)

    def make_sparse():
        torch.manual_seed(0)
        return sparse_gpt(cfg, lambda i: patterns.bigbird(64, 16, window_blocks=1, n_global_blocks=1,
                                                          n_random_blocks=1))

    x = torch.randint(0, 64, (2, 64), generator=torch.Generator().manual_seed(2))

    def run(model):
        torch.manual_seed(1)
        _, loss = model(x, x)
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters()]

    ref_loss, ref = run(make_sparse())
    for policy in ("core-attention", "selective", "full"):
        loss, got = run(apply_policy(make_sparse(), policy))
        assert torch.equal(loss, ref_loss) and all(torch.equal(a, b) for a, b in zip(got, ref)), policy


def test_measure_policies_with_a_control():
    x = torch.randint(0, 64, (2, 16))
    res = measure_policies(lambda: make(dropout=0.0, n_layer=2), (x, x), ("none", "full", "none#control"), rounds=1)
    assert [r.policy for r in res] == ["none", "full", "none#control"]
    assert res[2].activations == res[0].activations and res[1].activations < res[0].activations
    assert res[0].time_ratio == 1.0 and res[2].time_ratio > 0
