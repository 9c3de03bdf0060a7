"""Techniques compose: recomputation x sharding x attention core, and the wrappers honour PyTorch's interface.

All runs in float64: the claims are mathematical equality (see tests/test_parallel_strategies.py for
the 1e-9 bound: summation order ~1e-16 relative, amplified by at most lr/eps = 1e5 through AdamW;
a wrong reduction changes the first update by ~lr).
"""
import itertools

import pytest

from course.parallel import launch
from course.parallelize import Plan

import dp_workers

ATOL = 1e-9
RECOMPUTE = ("none", "full", "sqrt", "selective")
SHARDING = ("bucketed", "zero1", "zero2", "zero3", "fsdp2")
ATTENTION = ("sdpa", "block-sparse")
KINDS = ("naive", "bucketed", "ddp", "zero1", "zero2", "zero3")
# every (recompute, sharding) pair once; the attention core alternates so that every
# (recompute, attention) and (sharding, attention) pair appears too: a covering set of all pairs
CASES = [(r, s, ATTENTION[(i + j) % 2]) for (i, r), (j, s) in itertools.product(enumerate(RECOMPUTE), enumerate(SHARDING))]


def test_cases_cover_every_pair():
    for a, b in ((0, 1), (0, 2), (1, 2)):
        pairs = {(c[a], c[b]) for c in CASES}
        want = set(itertools.product(*[(RECOMPUTE, SHARDING, ATTENTION)[k] for k in (a, b)]))
        assert pairs == want


@pytest.fixture(scope="module")
def matrix():
    return launch.run(dp_workers.composition, 2, CASES, timeout=600).values[0]


@pytest.mark.parametrize("index", range(len(CASES)), ids=["-".join(c) for c in CASES])
def test_composition_equals_one_process(matrix, index):
    r = matrix[index]
    assert r["case"] == CASES[index]
    assert r["max_abs_diff"] < ATOL, r
    assert r["losses"] == pytest.approx(r["reference_losses"], rel=1e-12)


@pytest.fixture(scope="module")
def interface():
    per_rank = launch.run(dp_workers.interface_runs, 2, KINDS, timeout=300).values
    return {k: [r[k] for r in per_rank] for k in KINDS}, dp_workers.interface_reference()


@pytest.mark.parametrize("kind", KINDS)
def test_pytorch_style_user_code_equals_one_process(interface, kind):
    """A plain nn.Module with a frozen parameter, a buffer, tied and unused weights; the user's own
    backward, no_sync and torch.optim.AdamW. Rank 1 started from other weights: the broadcast fixed it."""
    runs, ref = interface
    for rank_state in runs[kind]:
        assert set(rank_state) == set(ref)
        for name in ref:
            assert (rank_state[name] - ref[name]).abs().max().item() < ATOL, (kind, name)
    assert (ref["unused.weight"] == dp_workers.TiedMLP(seed=100).double().unused.weight).all()  # never updated


def test_unused_parameter_without_the_flag_is_a_clear_error():
    kinds = ("bucketed", "zero1", "zero2", "zero3")
    for per_kind in launch.run(dp_workers.unused_errors, 2, kinds, timeout=120).values:
        for kind, m in per_kind.items():
            assert "unused.weight" in m and "find_unused_parameters=True" in m, (kind, m)


def test_plan_rejects_combinations_that_cannot_work():
    with pytest.raises(ValueError, match="shard='zero3'.*data_parallel='bucketed'"):
        Plan(shard="zero3", data_parallel="bucketed")
    with pytest.raises(ValueError, match="Plan.recompute must be one of"):
        Plan(recompute="half")
    with pytest.raises(ValueError, match="Plan.shard must be"):
        Plan(shard="zero4")
