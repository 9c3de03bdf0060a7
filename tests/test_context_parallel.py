"""Context parallelism on real gloo ranks: ring attention (contiguous and zig-zag), Ulysses all-to-all,
chapter 03's patterns, and the whole model trained with its sequences split, vs one process, in float64.

One launch per world size carries every distributed check (course.parallel.cp_experiments.cp_checks).
"""
import pytest
import torch

from course.costs import attention_pair_flops, ring_attention_bytes, ring_attention_saved_bytes, ulysses_bytes
from course.parallel import launch
from course.parallel.context import chunks_per_rank, shard_positions
from course.parallel.cp_experiments import cp_checks
from course.parallel.experiments import Setup

# float64 (eps 2.2e-16): the ring merges N partial softmaxes by the exact log-sum-exp rule; the results
# differ from one-pass attention only in summation order over <= 64 keys (~1e-15). A missing block or
# a wrong merge is off by O(0.1).
TOL = 1e-12
SETUP = Setup(n_head=4, dtype="float64")  # sequences of 16 tokens: zig-zag on 4 ranks gives chunks of 2
B, H, T, D = 2, 4, 32, 8  # check_attention's defaults


@pytest.fixture(scope="module")
def two_ranks():
    return launch.run(cp_checks, 2, SETUP, (), timeout=300).values


@pytest.fixture(scope="module")
def four_ranks():
    return launch.run(cp_checks, 4, SETUP, ("sliding_window", "longformer"), timeout=300).values


@pytest.fixture(params=[2, 4])
def ranks(request, two_ranks, four_ranks):
    return request.param, {2: two_ranks, 4: four_ranks}[request.param]


def test_forward_and_backward_equal_full_attention(ranks):
    n, values = ranks
    for r in values:
        assert len(r["attention"]) == 6  # ring contiguous / zig-zag and Ulysses, causal and not
        for name, c in r["attention"].items():
            assert max(c["diffs"].values()) < TOL, (n, name, c["diffs"])


def test_zigzag_balances_causal_work(ranks):
    n, values = ranks
    flops = {layout: [attention_pair_flops(r["attention"][f"ring {layout} causal=True"]["stats"]["pairs_computed"], D)
                      for r in values] for layout in ("contiguous", "zigzag")}
    assert max(flops["zigzag"]) <= 1.1 * min(flops["zigzag"])  # within 10%, counted
    assert max(flops["contiguous"]) == n * min(flops["contiguous"])  # the last rank computes N blocks, rank 0 one
    kept = [r["attention"]["ring zigzag causal=True"]["stats"]["pairs_kept"] for r in values]
    assert len(set(kept)) == 1  # each rank's (query, key) pairs inside the mask: exactly equal
    assert sum(kept) == B * H * T * (T + 1) // 2  # together: the causal triangle


def test_bytes_equal_formula(ranks):
    n, values = ranks
    ring = ring_attention_bytes(B, T, H * D, n, bytes_per_el=8)
    uly = ulysses_bytes(B, T, H * D, n, bytes_per_el=8)
    for r in values:
        c = r["attention"]["ring zigzag causal=True"]
        assert c["forward"]["bytes"]["send"] == ring["forward"] and c["total"]["bytes"]["send"] == ring["total"]
        assert c["forward"]["calls"]["send"] == n - 1
        u = r["attention"]["ulysses causal=True"]
        assert u["forward"]["total_bytes"] == uly["forward"] and u["total"]["total_bytes"] == uly["total"]
        assert u["total"]["calls"] == {"all_to_all": 4}  # q, k, v stacked; the output; and both backward


def test_timeline_has_every_ring_step(ranks):
    n, values = ranks
    for r in values:
        spans = r["attention"]["ring zigzag causal=False"]["spans"]
        compute = [name for kind, name, *_ in spans if kind == "compute"]
        assert compute == [f"ring step {s}" for s in range(n)] + [f"ring step {s} (backward)" for s in range(n)]
        assert sum(kind == "comm" for kind, *_ in spans) == (n - 1) + (n - 1) + n  # k, v; k, v; dk, dv


def test_patterns_skip_whole_ring_steps(four_ranks):
    """Causal local band (window <= one rank's tokens): rank r needs only its own and rank r-1's keys.
    Causal Longformer: also rank 0's (the global keys); rank 0's global queries see only the past: itself."""
    n = 4
    for r, rank_values in enumerate(four_ranks):
        band, longformer = rank_values["patterns"]["sliding_window"], rank_values["patterns"]["longformer"]
        assert max(band["diffs"].values()) < TOL and max(longformer["diffs"].values()) < TOL
        assert band["stats"]["steps_skipped"] == n - len({r, max(r - 1, 0)})
        assert longformer["stats"]["steps_skipped"] == n - len({r, max(r - 1, 0), 0})


def test_saved_bytes_per_rank_equal_formula(ranks):
    n, values = ranks
    for r in values:  # (B, H, T, D) = (2, 4, 64, 8) in float32
        assert r["memory"]["saved"] == ring_attention_saved_bytes(2, 64, 4 * 8, 4, n, bytes_per_el=4)


@pytest.mark.parametrize("method", ["ring", "ulysses"])
def test_training_equals_one_process(ranks, method):
    n, values = ranks
    for r in values:
        tr = r["train"][method]
        assert tr["max_abs_diff"] < TOL
        assert tr["losses"] == pytest.approx(tr["reference_losses"], abs=TOL)
        assert tr["grad_norms"] == pytest.approx(tr["reference_grad_norms"], abs=TOL)


def test_bad_inputs_name_the_numbers(ranks):
    n, values = ranks
    for r in values:
        assert f"n_head={n + 1} is not divisible by the context-parallel size {n}" in r["bad_inputs"]["heads"]
        assert f"does not split into {2 * n} equal chunks" in r["bad_inputs"]["sequence_length"]


def test_layouts():
    assert shard_positions(8, 0, 2, "contiguous").tolist() == [0, 1, 2, 3]
    assert shard_positions(8, 0, 2, "zigzag").tolist() == [0, 1, 6, 7]  # chunks 0 and 3 of 4
    assert shard_positions(8, 1, 2, "zigzag").tolist() == [2, 3, 4, 5]  # chunks 1 and 2
    every = torch.cat([shard_positions(24, r, 3, "zigzag") for r in range(3)])
    assert sorted(every.tolist()) == list(range(24))
    with pytest.raises(ValueError, match=r"sequence length 10 does not split into 8 equal chunks .* \[8, 16\]"):
        shard_positions(10, 0, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        chunks_per_rank("spiral")
