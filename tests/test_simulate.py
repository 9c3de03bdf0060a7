"""The step-time simulator (course.simulate) against the planner's closed form, its timeline's
consistency, and the calibration fits (course.scale_calibration) on synthetic data."""
from collections import defaultdict

import pytest

from course import costs, scale, simulate
from course import scale_calibration as cal
from course.parallel.schedules import Action

SMALL = scale.gpt3("Small")  # 12 layers, 12 heads: degrees 1, 2, 3, 4, 6, 12 divide both
NODE = scale.cluster("dgx-a100", 1)  # 8 GPUs


def test_one_stage_no_tp_no_dp_is_pure_compute():
    lay = scale.Layout(n_micro=4, micro_batch=2, recompute="none")
    cl = scale.cluster("dgx-a100", 1, gpus_per_node=1)
    sim = simulate.simulate(SMALL, cl, lay, efficiency=0.4)
    flops = costs.korthikanti_flops(SMALL.seq_len, 8, SMALL.d_model, SMALL.n_layer, SMALL.vocab, "none")
    # 8 spans summed in float64: equal up to rounding (relative 1e-12, far above 8 ulps)
    assert sim.step == pytest.approx(flops / (cl.gpu.peak_flops * 0.4), rel=1e-12)
    assert {s.kind for s in sim.spans} == {"F", "B"}


@pytest.mark.parametrize("tp,pp,v,m,schedule,recompute", [
    (1, 4, 1, 8, "1f1b", "full"), (2, 4, 1, 8, "1f1b", "none"), (2, 4, 3, 8, "interleaved", "full"),
    (1, 2, 1, 5, "gpipe", "selective"), (4, 1, 1, 3, "1f1b", "full")])
def test_agrees_with_planner_without_data_parallel(tp, pp, v, m, schedule, recompute):
    """No data parallelism and free pipeline hops: the planner's (compute + tensor)(1 + bubble) is the
    simulated timeline's length, because the IR's schedules with equal stages have exactly Megatron's
    bubble (p-1)/(v·m). Equal up to rounding (float sums over a few hundred spans: rel 1e-9)."""
    lay = scale.Layout(tp=tp, pp=pp, v=v, n_micro=m, recompute=recompute, schedule=schedule, sp=tp > 1)
    cl = scale.cluster("dgx-a100", 1, gpus_per_node=tp * pp)
    p = scale.plan(SMALL, cl, lay)
    sim = simulate.simulate(SMALL, cl, lay, pipeline_link=False)
    assert sim.step == pytest.approx(p.step - p.times["pipeline"], rel=1e-9)
    # with the hops: some of their time is hidden behind compute; the planner counts every hop exposed
    if pp > 1:
        hops = simulate.simulate(SMALL, cl, lay).step - sim.step
        assert 0 < hops <= p.times["pipeline"] * (1 + 1e-9)


@pytest.mark.parametrize("zero", [0, 1])
@pytest.mark.parametrize("n", [1, 4, 64])
def test_data_parallel_reduce_agrees_with_planner_within_one_bucket(zero, n):
    """pp = 1, tp = 1, dp = 8: the planner hides the whole reduce behind the last backward from its start;
    the simulator's first bucket is ready 1/n of the way in, each bucket pays its own ring latencies, and
    the last bucket starts no earlier than the backward's end. So 0 <= simulated - planned <= one bucket's
    share of the backward + (n-1) extra latencies + one bucket's time (exact inequalities, derived)."""
    for batch in (8, 64):  # the reduce longer than the backward, and shorter
        lay = scale.Layout(dp=8, n_micro=batch // 8, zero=zero, recompute="none")
        p = scale.plan(SMALL, NODE, lay)
        sim = simulate.simulate(SMALL, NODE, lay, buckets=n)
        work, link = sim.cost["B"], (NODE.intra_bw, NODE.intra_latency)
        op = "all_reduce" if zero == 0 else "reduce_scatter"
        grads = 2 * simulate.chunk_params(SMALL, lay, 0)
        bucket = costs.collective_seconds(op, grads / n, 8, *link)
        slack = work / n + (n - 1) * costs.COLLECTIVE_STEPS[op](8) * NODE.intra_latency + bucket
        assert -1e-12 <= sim.step - p.step <= slack + 1e-12


def test_no_overlap_exposes_the_whole_reduce():
    """overlap_dp=0: the buckets leave after the backward, one after the other: the step grows by
    exactly their total (pp = tp = 1, ZeRO-0: nothing else on the data link; float rounding, rel 1e-12)."""
    lay = scale.Layout(dp=8, n_micro=1, recompute="none")
    plain = simulate.simulate(SMALL, NODE, scale.Layout(dp=8, n_micro=1, recompute="none"), buckets=4, overlap_dp=0.0)
    compute = sum(s.end - s.start for s in plain.spans if s.stream == "compute")
    reduce = sum(s.end - s.start for s in plain.spans if s.kind == "reduce")
    assert plain.step == pytest.approx(compute + reduce, rel=1e-12)
    assert reduce == pytest.approx(4 * costs.collective_seconds("all_reduce", 2 * simulate.chunk_params(SMALL, lay, 0) / 4,
                                                                8, NODE.intra_bw, NODE.intra_latency), rel=1e-12)


def test_many_buckets_converge_to_planner():
    """With latency 0 and 4096 buckets the two differ by under 1/4096 of the backward plus one bucket."""
    cl = scale.cluster("dgx-a100", 1, intra_latency=0.0)
    lay = scale.Layout(dp=8, n_micro=1, recompute="none")
    p, sim = scale.plan(SMALL, cl, lay), simulate.simulate(SMALL, cl, lay, buckets=4096)
    assert sim.step == pytest.approx(p.step, rel=1e-3)


def _gpt3_sim(**kw):
    return simulate.simulate(scale.gpt3("175B"), scale.cluster("dgx-a100", 128),
                             scale.Layout(dp=8, tp=8, pp=16, n_micro=64, zero=1, sp=True, **kw),
                             tensor_within_node="order" not in kw)


def test_no_rank_does_two_things_at_once_and_dependencies_hold():
    sim = _gpt3_sim()
    streams = defaultdict(list)
    for s in sim.spans:
        assert s.end >= s.start and s.stream in simulate.STREAMS
        streams[(s.rank, s.stream)].append(s)
    for spans in streams.values():
        spans.sort(key=lambda s: (s.start, s.end))
        for a, b in zip(spans, spans[1:]):
            assert b.start >= a.end - 1e-12 * max(1.0, a.end), (a, b)
    compute = {s.label: s for s in sim.spans if s.kind in ("F", "B")}
    S = 16
    for s in (x for x in sim.spans if x.kind == "send"):  # a compute action starts after its input arrived
        a = Action.parse(s.label)
        nxt = Action(a.stage + 1, "F", a.mb) if a.kind == "F" else Action(a.stage - 1, "B", a.mb)
        assert compute[str(nxt)].start >= s.end - 1e-9
    for st in range(S):  # each micro-batch: forward before backward
        for i in range(64):
            assert compute[f"{st}B{i}"].start >= compute[f"{st}F{i}"].end
    assert sim.global_ranks[:3] == [0, 64, 128]


def test_story_layout_is_slower_in_the_simulator():
    story = _gpt3_sim(order=("pipeline", "tensor", "context", "data"))
    assert story.step > 1.5 * _gpt3_sim().step


def test_search_ranks_by_simulated_step():
    found = scale.search(SMALL, NODE, 32, rank_by="simulate", zeros=(0, 1), recomputes=("full",))
    sims = [q.simulated for q in found]
    assert sims == sorted(sims) and all(s > 0 for s in sims)
    with pytest.raises(ValueError, match="rank_by"):
        scale.search(SMALL, NODE, 32, rank_by="speed")


def test_alpha_beta_fit_recovers_synthetic_parameters():
    alpha, beta = 3e-5, 2.5e9
    samples = [(op, n, w, costs.collective_seconds(op, n, w, beta, alpha))
               for op in ("all_reduce", "send", "all_gather") for n in (1e3, 1e5, 1e7) for w in (2, 4)]
    a, b = cal.fit_alpha_beta(samples)
    assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(beta, rel=1e-9)  # exact data, lstsq rounding
    o, k, r = cal.fit_compute([(f, n, 0.01 + 0.003 * n + f / 2e10) for f, n in ((1e8, 1), (5e8, 1), (2e9, 1), (2e9, 4))])
    assert (o, k, r) == pytest.approx((0.01, 0.003, 2e10), rel=1e-9)


def test_calibrate_cpu_predicts_synthetic_runs_exactly():
    """Runs generated by the simulator itself from known parameters come back with zero error: the
    calibration pipeline (fits, layouts, cluster) is consistent end to end."""
    from course.parallel.calibration_runs import Runs
    r = Runs()
    coll, p2p, rate, over, per_pass = (1e-4, 1e9), (5e-5, 3e9), 2e10, 0.02, 0.004
    links = [(op, n, 2, costs.collective_seconds(op, n, 2, *((coll if op != "send" else p2p)[::-1])))
             for op in ("all_reduce", "send") for n in r.link_sizes]
    call = 7e-4  # each blocking call waits this long for its partner
    links.append(("sync", 1024, 2, costs.collective_seconds("all_reduce", 1024, 2, coll[1], coll[0]) + call))
    comp = [(b, k, over + k * per_pass + costs.korthikanti_flops(r.block_size, b, r.n_embd, r.n_layer,
                                                                   r.vocab_size) / rate) for b, k in r.compute_runs]
    layouts = {}
    for name in cal.CPU_LAYOUTS:
        lay = cal.cpu_layout(r, name)
        spec, cl = cal.cpu_case(r, rate, coll, p2p, lay)
        layouts[name] = simulate.simulate(spec, cl, lay, efficiency=1.0, bytes_per_el=4, step_overhead=over,
                                          pass_overhead=per_pass, buckets=r.dp_buckets,
                                          overlap_dp=cal.CPU_OVERLAP.get(name, 1.0), scatter_gather=False,
                                          call_overhead=call, vocab_parallel=True).step
    out = cal.calibrate_cpu({"runs": r, "links": links, "compute": comp, "layouts": layouts})
    assert all(abs(err) < 1e-9 for _, _, err in out["layouts"].values())
    assert out["fit"]["call_overhead"] == pytest.approx(call, rel=1e-6)  # lstsq rounding of α, β
    shared = cal.calibrate_cpu({"runs": r, "links": links, "compute": comp, "layouts": layouts, "world": 8, "cores": 2})
    assert shared["fit"]["call_overhead"] == 0.0  # ranks sharing cores: a wait is another rank's compute
    assert shared["fit"]["call_overhead_measured"] == pytest.approx(call, rel=1e-6)


def test_calibration_summarises_repeats_by_the_statistic_asked_for():
    from course.parallel.calibration_runs import Runs, summary
    times = [0.001, 0.002, 0.006]
    assert (summary(times), summary(times, "median"), summary(times, "min")) == pytest.approx((0.003, 0.002, 0.001))
    with pytest.raises(ValueError, match="statistic.*'max'"):
        Runs(statistic="max")
    with pytest.raises(ValueError, match="no times"):
        summary([])


def test_bad_inputs():
    lay = scale.Layout(dp=8, n_micro=1)
    for kw, match in ((dict(buckets=0), "buckets"), (dict(step_overhead=-1.0), "step_overhead"),
                      (dict(efficiency=1.5), "efficiency"), (dict(bytes_per_el=0), "bytes_per_el"),
                      (dict(overlap_dp=2), "overlap_dp"), (dict(pass_overhead=-1), "pass_overhead"),
                      (dict(call_overhead=-1e-3), "call_overhead")):
        with pytest.raises(ValueError, match=match):
            simulate.simulate(SMALL, NODE, lay, **kw)
    with pytest.raises(ValueError, match="dp x tp x pp x cp"):
        simulate.simulate(SMALL, NODE, scale.Layout(dp=4, n_micro=1))
    with pytest.raises(ValueError, match="samples"):
        cal.fit_alpha_beta([("send", 1e3, 2, 1e-5)])
    with pytest.raises(ValueError, match="separate"):
        cal.fit_alpha_beta([("send", 1e3, 2, 1e-5), ("send", 1e3, 2, 1e-5)])
    with pytest.raises(ValueError, match="op in"):
        cal.fit_alpha_beta([("broadcast", 1e3, 2, 1e-5), ("send", 1e4, 2, 1e-5)])


def test_vocabulary_parallel_ends_add_their_collectives_once_per_micro_batch():
    """Embedding all-reduce (F), head input-gradient all-reduce (B), cross-entropy's three small ones (F):
    on one pipeline stage, m micro-batches pay them m times, on the compute stream."""
    lay = scale.Layout(dp=4, tp=2, n_micro=4)  # the reduce after the backward (overlap 0) shifts with it
    off, on = (simulate.simulate(SMALL, NODE, lay, vocab_parallel=v, overlap_dp=0.0) for v in (False, True))
    v = on.cost["vocab"]
    assert v["first_F"] > 0 and v["last_F"] > 0 and v["last_B"] > 0
    assert on.step - off.step == pytest.approx(lay.n_micro * (v["first_F"] + v["last_F"] + v["last_B"]), rel=1e-9)
