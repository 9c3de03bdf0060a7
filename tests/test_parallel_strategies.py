"""Every data-parallel strategy vs one process on the full batch, on real gloo ranks, through the one loop.

Two launches (2 ranks: all strategies, with and without gradient accumulation; 4 ranks with padding)
carry all the distributed checks, because spawning ranks costs seconds and a tiny training step
milliseconds. The runs are in float64 because the claim is mathematical equality: a different
summation order changes a float64 gradient by ~1e-16 relative; AdamW's update moves a parameter by
at most lr·|Δm|/eps per unit of gradient error (lr/eps = 1e5 here), so 3 steps stay below 1e-9,
while a missing, doubled or unaveraged reduction changes the very first update by ~lr = 1e-3.
"""
import pytest

from course.costs import model_state_bytes, ring_bytes
from course.parallel import launch
from course.parallel.experiments import STRATEGIES, Setup, build_model, compare_many

ATOL = 1e-9  # see the module docstring
F64 = Setup(dtype="float64")
# n_embd=30 and vocab 63: dims not multiples of 4, so ZeRO pads (the formulas use the padded count)
FOUR = Setup(dtype="float64", n_embd=30, n_head=3, vocab_size=63, steps=3)
SHARDED = {"naive": 0, "bucketed": 0, "ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}


@pytest.fixture(scope="module")
def two_ranks():
    jobs = [
        (F64, STRATEGIES),
        (Setup(dtype="float64", micro_batches=2), STRATEGIES),
        (Setup(dtype="float64", micro_batches=2, sync_every_micro_batch=True), ("bucketed",)),
    ]
    return launch.run(compare_many, 2, jobs, timeout=300).values


@pytest.fixture(scope="module")
def four_ranks():
    jobs = [(FOUR, ("naive", "zero1", "zero2", "zero3"))]
    return launch.run(compare_many, 4, jobs, timeout=300).values


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_parameters_as_one_process(two_ranks, name):
    for rank_values in two_ranks:
        for run in rank_values[:2]:
            r = run["results"][name]
            assert r["max_abs_diff"] < ATOL, (name, r["max_abs_diff"])
            assert r["grad_norms"] == pytest.approx(run["reference_grad_norms"], rel=1e-12)
            assert r["losses"] == pytest.approx(run["reference_losses"], rel=1e-12)


def test_ranks_agree(two_ranks):
    a, b = (values[0]["results"] for values in two_ranks)
    for name in STRATEGIES:
        assert a[name]["losses"] == b[name]["losses"]  # averaged over ranks: the same number on both


def test_gradient_accumulation_matches_and_communicates_once(two_ranks):
    plain, accum, every = two_ranks[0]
    once = accum["results"]["bucketed"]["comm"]
    twice = every["results"]["bucketed"]["comm"]
    assert once["calls"] == plain["results"]["bucketed"]["comm"]["calls"]  # 2 micro-batches, one all-reduce
    assert twice["calls"]["all_reduce"] == 2 * once["calls"]["all_reduce"]
    assert twice["total_bytes"] == 2 * once["total_bytes"]
    assert every["results"]["bucketed"]["max_abs_diff"] < ATOL
    z1 = accum["results"]["zero1"]["comm"]  # stage 1 accumulates full gradients: reduced once
    assert z1["calls"] == plain["results"]["zero1"]["comm"]["calls"]
    z2 = accum["results"]["zero2"]["comm"]  # sharded gradients cannot wait: reduced every micro-batch
    assert z2["calls"]["reduce_scatter"] == 2 * plain["results"]["zero2"]["comm"]["calls"]["reduce_scatter"]


def _check_bytes_and_memory(run, world):
    for name, r in run["results"].items():
        if r["comm"] is None:
            continue
        psi_bytes = 8 * r["psi"]  # float64
        factor = 3 if name == "zero3" else 2  # ZeRO-3 = 1.5x data parallel
        assert r["comm"]["total_bytes"] == factor * (world - 1) / world * psi_bytes, name
        if name in ("naive", "bucketed"):
            assert set(r["comm"]["calls"]) == {"all_reduce"}
        expected = model_state_bytes(r["psi"], "fp32", SHARDED[name], world)  # 4, 4, 8 bytes per element
        for part in ("params", "grads", "optimizer", "total"):
            assert r["memory"][part] == 2 * expected[part], (name, part, r["memory"], expected)  # float64: x2


def test_comm_bytes_and_memory_match_formulas_2_ranks(two_ranks):
    _check_bytes_and_memory(two_ranks[0][0], 2)
    r = two_ranks[0][0]["results"]
    assert r["zero3"]["comm"]["total_bytes"] == 1.5 * r["naive"]["comm"]["total_bytes"]
    fsdp = r["fsdp2"]["memory"]["total"]  # FSDP2 also cuts every parameter along dim 0
    assert fsdp == 2 * model_state_bytes(r["fsdp2"]["psi"], "fp32", 3, 2)["total"]


def test_four_ranks_with_padding(four_ranks):
    for values in four_ranks:
        run = values[0]
        for name, r in run["results"].items():
            assert r["max_abs_diff"] < ATOL, name
        _check_bytes_and_memory(run, 4)
    r = four_ranks[0][0]["results"]
    model = build_model(FOUR)
    rows = lambda p: -(-p.shape[0] // 4) * 4  # dim 0 padded to a multiple of the 4 ranks
    assert r["naive"]["psi"] == sum(p.numel() for p in model.parameters())
    assert r["zero1"]["psi"] == sum(rows(p) * (p.numel() // p.shape[0]) for p in model.parameters())
    assert r["zero1"]["psi"] > r["naive"]["psi"]


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
    gb = [model_state_bytes(7.5e9, "mixed", stage, 64)["total"] / 1e9 for stage in (0, 1, 2, 3)]
    assert [round(x, 1) for x in gb] == [120.0, 31.4, 16.6, 1.9]


def test_ring_bytes():
    assert ring_bytes("all_reduce", 100, 4) == 150
    assert ring_bytes("all_gather", 100, 4) + ring_bytes("reduce_scatter", 100, 4) == ring_bytes("all_reduce", 100, 4)
    assert ring_bytes("all_reduce", 100, 1) == 0
    with pytest.raises(ValueError, match="op must be one of"):
        ring_bytes("gossip", 100, 2)
