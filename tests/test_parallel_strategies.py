"""Every data-parallel strategy vs one process on the full batch, on real gloo ranks.

Two launches (2 ranks: all strategies + gradient accumulation; 4 ranks with padding) carry all the
distributed checks, because spawning ranks costs seconds and a tiny training step milliseconds.
"""
import pytest
import torch

from course.parallel import launch
from course.parallel.comm import ring_bytes
from course.parallel.experiments import STRATEGIES, Setup, compare_many
from course.parallel.zero import model_state_bytes

ATOL = 1e-5  # fp32 after 3 AdamW steps: summation order gives ~1e-6; a missing reduction gives >1e-4
SHARDED = {"naive": 0, "bucketed": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}
FP32 = dict(param_bytes=4, grad_bytes=4, optim_bytes=8)  # what the code runs: fp32 AdamW


@pytest.fixture(scope="module")
def two_ranks():
    jobs = [
        (Setup(), STRATEGIES),
        (Setup(micro_batches=2), ("naive", "bucketed", "zero1", "zero2", "zero3", "ddp")),
        (Setup(micro_batches=2, sync_every_micro_batch=True), ("bucketed",)),
    ]
    return launch.run(compare_many, 2, jobs, timeout=240).values


@pytest.fixture(scope="module")
def four_ranks():
    # n_embd=30: groups are not multiples of 4, so ZeRO pads (formulas use the padded count)
    jobs = [(Setup(n_embd=30, n_head=3, steps=2), ("naive", "zero1", "zero2", "zero3"))]
    return launch.run(compare_many, 4, jobs, timeout=240).values


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_parameters_as_one_process(two_ranks, name):
    for rank_values in two_ranks:
        run = rank_values[0]
        r = run["results"][name]
        assert r["max_abs_diff"] < ATOL, (name, r["max_abs_diff"])
        assert r["memory"]["grad_norm"] == pytest.approx(run["reference_grad_norm"], rel=1e-5)
        assert r["losses"] == pytest.approx(run["reference_losses"], abs=1e-5)


def test_ranks_agree(two_ranks):
    a, b = (values[0]["results"] for values in two_ranks)
    for name in STRATEGIES:
        assert a[name]["losses"] == b[name]["losses"]
        assert a[name]["max_abs_diff"] == pytest.approx(b[name]["max_abs_diff"], abs=1e-7)


def test_gradient_accumulation_matches_and_communicates_once(two_ranks):
    plain, accum, every = two_ranks[0]
    for name, r in accum["results"].items():
        assert r["max_abs_diff"] < ATOL, name
        assert r["memory"]["grad_norm"] == pytest.approx(accum["reference_grad_norm"], rel=1e-5)
    once = accum["results"]["bucketed"]["comm"]
    twice = every["results"]["bucketed"]["comm"]
    assert once == plain["results"]["bucketed"]["comm"]  # 2 micro-batches, still one all-reduce each
    assert twice["calls"]["all_reduce"] == 2 * once["calls"]["all_reduce"]
    assert every["results"]["bucketed"]["max_abs_diff"] < ATOL
    z2 = accum["results"]["zero2"]["comm"]  # sharded gradients cannot wait: reduced every micro-batch
    assert z2["calls"]["reduce_scatter"] == 2 * plain["results"]["zero2"]["comm"]["calls"]["reduce_scatter"]


def _check_bytes_and_memory(run, world):
    for name, r in run["results"].items():
        if r["comm"] is None:
            continue
        psi_bytes = 4 * r["psi"]
        factor = 3 if name == "zero3" else 2  # ZeRO-3 = 1.5x data parallel
        assert r["comm"]["total_bytes"] == pytest.approx(factor * (world - 1) / world * psi_bytes, rel=1e-12), name
        if name in ("naive", "bucketed"):
            assert set(r["comm"]["calls"]) == {"all_reduce"}
        expected = model_state_bytes(r["psi"], world, SHARDED[name], **FP32)
        for part in ("params", "grads", "optimizer", "total"):
            assert r["memory"][part] == expected[part], (name, part, r["memory"], expected)


def test_comm_bytes_and_memory_match_formulas_2_ranks(two_ranks):
    _check_bytes_and_memory(two_ranks[0][0], 2)
    r = two_ranks[0][0]["results"]
    assert r["zero3"]["comm"]["total_bytes"] == 1.5 * r["naive"]["comm"]["total_bytes"]
    # FSDP2 shards each parameter along dim 0 (its own padding): close to the ZeRO-3 formula
    fsdp = r["fsdp2"]["memory"]["total"]
    assert fsdp == pytest.approx(model_state_bytes(r["fsdp2"]["psi"], 2, 3, **FP32)["total"], rel=0.02)


def test_four_ranks_with_padding(four_ranks):
    for values in four_ranks:
        run = values[0]
        for name, r in run["results"].items():
            assert r["max_abs_diff"] < ATOL, name
        _check_bytes_and_memory(run, 4)
    r = four_ranks[0][0]["results"]
    unpadded, padded = r["naive"]["psi"], r["zero1"]["psi"]
    assert unpadded < padded < unpadded + 4 * 3  # under N elements of padding in each of the 3 groups


def test_timeline_naive_waits_bucketed_overlaps(two_ranks):
    r = two_ranks[0][0]["results"]

    def backward_end(spans):
        return max(end for kind, name, start, end in spans if name == "backward")

    naive, bucketed = r["naive"]["spans"], r["bucketed"]["spans"]
    assert all(start >= backward_end(naive) for kind, _, start, _ in naive if kind == "comm")
    comm_starts = [start for kind, _, start, _ in bucketed if kind == "comm"]
    assert len(comm_starts) > 1 and min(comm_starts) < backward_end(bucketed)  # launched inside backward


def test_zero_paper_example():
    """Rajbhandari et al. 2020, figure 1: 7.5B parameters, 64 GPUs, K = 12."""
    gb = [model_state_bytes(7.5e9, 64, stage)["total"] / 1e9 for stage in (0, 1, 2, 3)]
    assert [round(x, 1) for x in gb] == [120.0, 31.4, 16.6, 1.9]


def test_ring_bytes():
    assert ring_bytes("all_reduce", 100, 4) == 150
    assert ring_bytes("all_gather", 100, 4) + ring_bytes("reduce_scatter", 100, 4) == ring_bytes("all_reduce", 100, 4)
    assert ring_bytes("all_reduce", 100, 1) == 0
    with pytest.raises(ValueError, match="op"):
        ring_bytes("all_to_all", 100, 2)
