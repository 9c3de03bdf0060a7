"""Pipeline schedules as data: generators, validator, simulator and the bubble formulas (pure Python, fast)."""
import math

import pytest

from course.costs import gpipe_bubble_fraction, megatron_bubble_ratio, pipeline_hop_elements, zb_h1_bubble_time
from course.lessons.pipeline import comm_per_step, explore, formula_ratio, unit_costs
from course.parallel.schedules import (Action, Schedule, from_compute, gpipe, interleaved_1f1b, make, one_f_one_b,
                                       simulate, validate, zb_h1)

COST = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}  # small integers: the simulated times are exact in floats
# bubble = 1 - busy / (p · makespan): one division of exact integers, correct to an ulp; 1e-12 is the bound
EXACT = 1e-12


def _all(p, m):
    yield gpipe(p, m)
    yield one_f_one_b(p, m)
    yield zb_h1(p, m)
    if m % p == 0:
        yield interleaved_1f1b(p, m, 2)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_generated_schedules_are_valid_and_complete(p, m):
    for s in _all(p, m):
        validate(s)
        for r in range(p):
            kinds = [a.kind for a in s.compute(r)]
            assert kinds.count("F") == m * s.v, (s.name, r)
            if s.name == "zb-h1":
                assert kinds.count("I") == kinds.count("W") == m and "B" not in kinds
            else:
                assert kinds.count("B") == m * s.v and "I" not in kinds


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 32])
def test_gpipe_and_1f1b_bubble_is_the_formula(p, m):
    """Equal stages, no link cost: the simulated idle share is GPipe's (p-1)/(m+p-1) and the bubble over the
    ideal time Megatron's (p-1)/m, for both schedules (Narayanan et al. 2021, section 2.2.1)."""
    for s in (gpipe(p, m), one_f_one_b(p, m)):
        tl = simulate(s, COST)
        assert abs(tl.bubble - gpipe_bubble_fraction(p, m)) < EXACT, s.name
        assert abs(tl.bubble_ratio - megatron_bubble_ratio(p, m)) < EXACT, s.name


@pytest.mark.parametrize("p,m,v", [(2, 2, 2), (2, 8, 2), (4, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 2), (3, 9, 3)])
def test_interleaved_bubble_is_divided_by_v(p, m, v):
    """A chunk holds 1/v of a stage's layers, so its forward costs 1/v: bubble/ideal = (p-1)/(v·m)."""
    tl = simulate(interleaved_1f1b(p, m, v), {k: c / v for k, c in COST.items()})
    assert abs(tl.bubble_ratio - megatron_bubble_ratio(p, m, v)) < EXACT


@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 24)])
def test_zb_h1_idle_time_is_the_formula(p, m):
    """Qi et al. 2023, section 2.1 (ZB-H1): idle time per rank (p-1)(F + I - W), a third of 1F1B's with F = I = W."""
    for cost in (COST, {"F": 1.0, "B": 3.0, "I": 2.0, "W": 1.0}):
        tl = simulate(zb_h1(p, m), cost)
        assert tl.makespan - max(tl.busy) == zb_h1_bubble_time(p, cost["F"], cost["I"], cost["W"])
    one = simulate(one_f_one_b(p, m), COST)
    assert one.makespan - max(one.busy) == 3 * zb_h1_bubble_time(p, 1.0, 1.0, 1.0)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_peak_live_activations(p, m):
    """GPipe keeps all m; 1F1B p - r on rank r (at most p); ZB-H1 at most p (Qi et al. 2023: 1F1B's peak);
    interleaved rank 0: (v-1)p + 2(p-1) + 1 = vp + p - 1 chunks of 1/v stage (Korthikanti et al. 2022, 4.2.3)."""
    assert validate(gpipe(p, m)) == [m] * p
    assert validate(one_f_one_b(p, m)) == [min(p - r, m) for r in range(p)]
    assert max(validate(zb_h1(p, m))) == min(p, m)
    for v in (2, 3):
        if m % p == 0:
            peak = validate(interleaved_1f1b(p, m, v))
            assert peak[0] == min(v * p + p - 1, v * m)
            assert peak[0] / v <= p + (p - 1) / v


def test_1f1b_phases():
    s = one_f_one_b(4, 8)
    assert [str(a) for a in s.compute(1)] == ["1F0", "1F1", "1F2", "1B0", "1F3", "1B1", "1F4", "1B2", "1F5", "1B3",
                                               "1F6", "1B4", "1F7", "1B5", "1B6", "1B7"]
    assert [str(a) for a in s.ranks[1][:4]] == ["1RECV_F0", "1F0", "1SEND_F0", "1RECV_F1"]


def test_link_cost_adds_to_the_critical_path():
    """m = 1 GPipe: the activations cross p-1 links forward and p-1 back, each `link` late."""
    for p in (2, 4):
        base, slow = simulate(gpipe(p, 1), COST), simulate(gpipe(p, 1), COST, link=0.5)
        assert slow.makespan - base.makespan == 2 * (p - 1) * 0.5


def test_csv_round_trip_in_pytorch_format():
    s = zb_h1(4, 8)
    rows = s.to_csv().strip().splitlines()
    assert rows[0].startswith("0F0,0F1,0F2,0F3,0I0,0W0")
    again = from_compute("zb-h1", 4, 8, 1, [[Action.parse(x) for x in row.split(",")] for row in rows])
    assert again.ranks == s.ranks
    assert Action.parse("12SEND_F3") == Action(12, "SEND_F", 3)


def _broken(ranks, p=2, m=1):
    return Schedule("hand-written", p, m, 1, [[Action.parse(x) for x in r.split()] for r in ranks])


GOOD = ["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"]


@pytest.mark.parametrize("ranks,rule,action", [
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1B0 1F0 1SEND_B0"], "forward before backward", "1B0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1F0 1B0 1SEND_B0"], "every send has its receive", "0SEND_F0"),
    (["0F0 0RECV_B0 0SEND_F0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0"], "no deadlock", "0RECV_B0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1B0 1SEND_B0 1F0"], "each action once", "1F0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0 1F0", "1RECV_F0 1F0 1B0 1SEND_B0"], "stage placement", "1F0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1SEND_B0 1B0"], "data before use", "1SEND_B0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1W0 1I0 1SEND_B0"], "input gradient before weight gradient", "1W0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F0 1I0 1SEND_B0"], "every backward runs", "1W0"),
    (["0F0 0SEND_F0 0RECV_B0 0B0", "1RECV_F0 1F1 1B0 1SEND_B0"], "well-formed", "1F1"),
])
def test_validator_names_the_first_broken_rule(ranks, rule, action):
    validate(_broken(GOOD))  # the unbroken version passes
    with pytest.raises(ValueError, match=f"rule '{rule}': rank \\d, action {action}"):
        validate(_broken(ranks))


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="m must be an integer >= 1"):
        gpipe(2, 0)
    with pytest.raises(ValueError, match="p must be an integer >= 2"):
        one_f_one_b(1, 4)
    with pytest.raises(ValueError, match="multiple of p"):
        interleaved_1f1b(4, 6, 2)
    with pytest.raises(ValueError, match="v >= 2"):
        interleaved_1f1b(2, 4, 1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        make("pipedream", 2, 4)
    with pytest.raises(ValueError, match="v=1"):
        make("1f1b", 2, 4, v=2)


def test_explorer_logic():
    r = explore(4, 8, 2, "interleaved")
    assert abs(r["ratio"] - megatron_bubble_ratio(4, 8, 2)) < EXACT
    assert r["peak_microbatches"][0] == (2 * 4 + 4 - 1) / 2
    assert abs(explore(4, 8, 2, "gpipe")["bubble"] - gpipe_bubble_fraction(4, 8)) < EXACT
    with pytest.raises(ValueError, match="multiple of p"):
        explore(4, 6, 2, "interleaved")


def test_pipeline_hop_vs_tensor_parallel_bytes():
    """GPT-3 sizes (b=1, s=2048, h=12288, 96 layers) on 8 ranks, bf16: a hop is b·s·h elements."""
    c = comm_per_step(1, 2048, 12288, 96, 8, m=1)
    assert c["hop_bytes"] == pipeline_hop_elements(1, 2048, 12288) * 2 == 2048 * 12288 * 2
    assert math.isclose(c["tensor_bytes"] / c["pipeline_bytes"], 4 * 2 * 7 / 8 * 96 / 2)
    with pytest.raises(ValueError, match="b must be a positive integer"):
        pipeline_hop_elements(0, 2048, 12288)


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 8), (8, 16)])
def test_the_lessons_formula_column_is_each_schedules_own(p, m):
    """Lesson 07's table puts beside each schedule the bubble/ideal its paper gives; the simulator, which
    knows only the per-action costs and the dependencies, must land on it (ZB-H1: for m >= p only)."""
    for name, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb-h1", 1)):
        sim = simulate(make(name, p, m, v), unit_costs(v))
        assert math.isclose(sim.bubble_ratio, formula_ratio(name, p, m, v), rel_tol=1e-12), name
    assert formula_ratio("zb-h1", p, m) == pytest.approx((p - 1) / (3 * m))  # Qi et al.: a third of 1F1B's
    assert formula_ratio("zb-h1", 4, 2) is None  # m < p: the deferred W passes cannot fill the cool-down
