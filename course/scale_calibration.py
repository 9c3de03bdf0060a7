"""Calibrating the planner (course.scale): its one compute parameter, the achieved fraction of peak.

    eff = megatron_efficiency()             # fitted on ONE row of Narayanan et al. 2021, Table 1
    scale.plan(model, cluster, layout, efficiency=eff)

`calibrate` solves plan(...).tflops_per_gpu == measured for the efficiency. The published calibration
uses Table 1's 145.6B row and is tested by predicting the other nine rows and Table 2's strong scaling
(tests/test_scale.py). Calibration on our own measured 3D runs (fitted compute rate and alpha-beta
links) plugs in here next to it once the tensor and pipeline chapters are merged.
"""
from __future__ import annotations

from . import scale
from .scale_presets import MEGATRON_TABLE1, cluster, megatron_spec


def calibrate(model, cluster, layout, tflops_per_gpu: float, **kw) -> float:
    """The efficiency at which plan(model, cluster, layout, **kw) reaches a measured TFLOP/s per GPU.
    Planned throughput rises monotonically with the efficiency, so bisection finds it (60 halvings of
    (0, 1]: below 1e-15, far under any throughput's precision)."""
    def planned(eff):
        return scale.plan(model, cluster, layout, efficiency=eff, **kw).tflops_per_gpu
    if not (isinstance(tflops_per_gpu, (int, float)) and tflops_per_gpu > 0):
        raise ValueError(f"tflops_per_gpu must be a positive number, got {tflops_per_gpu!r}")
    if planned(1.0) < tflops_per_gpu:
        raise ValueError(f"{tflops_per_gpu} TFLOP/s per GPU is more than the layout reaches at 100% of peak "
                         f"({planned(1.0):.1f}): check the measurement or the layout")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if planned(mid) < tflops_per_gpu else (lo, mid)
    return (lo + hi) / 2


# Narayanan et al. 2021, Table 1 as the planner sees it. The paper does not list each row's micro-batch
# size or schedule; we assume micro-batch 1, 1F1B, full recomputation (Table 1's FLOPs are eq. 3's, which
# count it), no sequence parallelism (it came with Korthikanti et al. 2022), scatter/gather on, and the
# gradient all-reduce after the last backward, not overlapped (overlap_dp=0). CALIBRATION_ROW is the one
# row the efficiency is fitted on; every other row is a prediction.
CALIBRATION_ROW = 6  # the 145.6B row (t = 8, p = 8, 1,536 GPUs): the layout closest to GPT-3 175B
MEGATRON_OPTIONS = dict(overlap_dp=0.0, scatter_gather=True)


def megatron_case(row) -> tuple:
    """(model, cluster, layout) for one row of MEGATRON_TABLE1 under the assumptions above."""
    _, _, _, _, t, p, n, batch = row[:8]
    spec = megatron_spec(row)
    d = n // (t * p)
    return spec, cluster("dgx-a100", n // 8), scale.Layout(dp=d, tp=t, pp=p, n_micro=batch // d, recompute="full")


def megatron_efficiency() -> float:
    """Achieved fraction of A100 peak, calibrated on Table 1's CALIBRATION_ROW only."""
    row = MEGATRON_TABLE1[CALIBRATION_ROW]
    return calibrate(*megatron_case(row), row[8], **MEGATRON_OPTIONS)


# ----------------------------------------------------------------------------- our own CPU runs
# The step-time simulator (course.simulate) calibrated on this machine: a compute rate and an α–β link
# fitted on microbenchmarks (course.parallel.calibration_runs), then asked to predict the step time of
# parallel layouts it was not fitted on.


def fit_linear(features, ys, relative: bool = False) -> list[float]:
    """Least-squares coefficients c of ys ≈ features @ c (float64; exact when the data fit exactly).
    relative: minimise relative errors (rows divided by y), so that samples spanning orders of magnitude
    (small messages: latency, large ones: bandwidth) each count."""
    import numpy as np
    X, y = np.asarray(features, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if X.ndim != 2 or len(X) != len(y) or len(y) < X.shape[1]:
        raise ValueError(f"need at least {X.shape[1] if X.ndim == 2 else '?'} samples of {X.shape[1:]} features "
                         f"with one time each, got features of shape {X.shape} and {len(y)} times")
    if np.linalg.matrix_rank(X) < X.shape[1]:
        raise ValueError("the samples cannot separate the parameters (vary the sizes: e.g. message bytes)")
    w = 1 / y if relative else np.ones_like(y)
    col = np.abs(X).max(axis=0)  # columns scaled to 1: FLOPs (1e9) beside counts (1) would be ill-conditioned
    return (np.linalg.lstsq(X * w[:, None] / col, y * w, rcond=None)[0] / col).tolist()


def fit_alpha_beta(samples) -> tuple[float, float]:
    """(α seconds per step, β bytes/s) of t = steps·α + bytes sent/β (Hockney 1994) from samples
    (op, nbytes, world, seconds), ops as in costs.collective_seconds (ring steps and bytes per rank);
    least squares on relative errors."""
    from .costs import COLLECTIVE_STEPS, ring_bytes
    for op, n, world, secs in samples:
        if op not in COLLECTIVE_STEPS or not (isinstance(secs, (int, float)) and secs > 0):
            raise ValueError(f"a link sample is (op in {sorted(COLLECTIVE_STEPS)}, bytes, world, seconds > 0), "
                             f"got {(op, n, world, secs)!r}")
    feats = [(COLLECTIVE_STEPS[op](w), n if op == "send" else ring_bytes(op, n, w)) for op, n, w, _ in samples]
    alpha, inv_beta = fit_linear(feats, [s[3] for s in samples], relative=True)
    if inv_beta <= 0:
        raise ValueError(f"the fitted time per byte is {inv_beta:.3g} s: the samples do not grow with size")
    return max(alpha, 0.0), 1.0 / inv_beta


def fit_compute(samples) -> tuple[float, float, float]:
    """(seconds per step, seconds per forward-backward pass, FLOP/s) of
    t = step overhead + passes · pass overhead + FLOPs/rate, from samples (FLOPs, passes, seconds):
    the optimizer step, the fixed cost of running the model once (Python, kernel launches), the matmuls."""
    step, per_pass, inv_rate = fit_linear([(1.0, k, f) for f, k, _ in samples], [t for *_, t in samples])
    if inv_rate <= 0:
        raise ValueError(f"the fitted time per FLOP is {inv_rate:.3g} s: the step time does not grow with FLOPs")
    return max(step, 0.0), max(per_pass, 0.0), 1.0 / inv_rate


def call_overhead(links, collective: tuple) -> float:
    """Seconds a blocking call costs beyond α–β: the "sync" samples (a small all-reduce right after
    compute, course.parallel.calibration_runs) less the fitted time of the same all-reduce back to back.
    0 when there are no such samples or they are not slower."""
    from .costs import collective_seconds
    sync = [(n, w, secs) for op, n, w, secs in links if op == "sync"]
    if not sync:
        return 0.0
    a, b = collective
    extra = [secs - collective_seconds("all_reduce", n, w, b, a) for n, w, secs in sync]
    return max(sum(extra) / len(extra), 0.0)


def cpu_case(runs, rate: float, collective: tuple, p2p: tuple, layout):
    """(GPTSpec, Cluster) of the calibration runs' model on layout.world CPU processes with gloo links:
    collectives (tensor, data) on the fitted all-reduce link (α, β), pipeline sends on the fitted
    point-to-point one. gloo's all-reduce also sums and copies, so its time per byte is not a send's; the
    cluster says so by putting each pipeline stage in its own 'node' (the planner's inter-node link)."""
    from .scale_presets import GPU, Cluster, GPTSpec
    spec = GPTSpec("CPU model", runs.n_layer, runs.n_embd, runs.n_head, vocab=runs.vocab_size, seq_len=runs.block_size)
    gpu = GPU("CPU process", rate, 1e15, "fitted compute rate of one process (course.parallel.calibration_runs)")
    (a_c, b_c), (a_p, b_p) = collective, p2p
    return spec, Cluster(gpu, layout.world // layout.pp, layout.pp, b_c, b_p, a_c, a_p,
                         name=f"{layout.world} CPU processes, gloo")


CPU_LAYOUTS = {"DP 2": dict(dp=2), "TP 2": dict(tp=2), "PP 2": dict(pp=2), "3D 2x2x2": dict(dp=2, tp=2, pp=2)}
# How much of the gradient reduce hides behind the backward. On a GPU, DDP's buckets go out on the
# network while the backward runs (overlap 1). Here every core runs a rank's backward and gloo's
# all-reduce sums and copies on those same cores, so nothing is hidden (overlap 0): with overlap 1 the
# simulator put DP 2 at -18 % to -20 %, with 0 at -8 % (quiet 2-core AMD EPYC). The 3D model averages
# after the schedule anyway (course.parallel.threed).
CPU_OVERLAP = {"DP 2": 0.0, "3D 2x2x2": 0.0}


def cpu_layout(runs, name: str, dims: dict = None):
    """scale.Layout of a measured CPU layout (no recomputation, 1F1B with runs.pp_micro_batches)."""
    dims = dims or CPU_LAYOUTS[name]
    dp, pp = dims.get("dp", 1), dims.get("pp", 1)
    m = runs.pp_micro_batches // dp if pp > 1 else 1  # the 3D run: the same micro-batch size as PP 2
    return scale.Layout(dp=dp, tp=dims.get("tp", 1), pp=pp, micro_batch=runs.batch_size // (dp * m), n_micro=m,
                        recompute="none")


def calibrate_cpu(res: dict, layouts: dict | None = None) -> dict:
    """Fit (compute rate, per-step and per-pass overheads, α–β of collectives and of sends) on res["links"] and
    res["compute"] and predict every
    measured layout with course.simulate: {"fit": ..., "layouts": {name: (measured, predicted, error)}}."""
    from . import costs, simulate
    runs = res["runs"]
    coll = fit_alpha_beta([x for x in res["links"] if x[0] not in ("send", "sync")])
    p2p = fit_alpha_beta([x for x in res["links"] if x[0] == "send"])
    # A rank waiting in a collective idles its core only when it has one of its own. With more ranks
    # than cores (8 on 2 here) the core runs another rank meanwhile: the fitted compute rate of ranks
    # sharing cores already holds that time, and adding the wait counted it twice (3D 2x2x2: +24 % to
    # +32 % with it, -8 % to 0 % without, on the quiet 2-core AMD EPYC; issue 14's closing note).
    measured_call = call_overhead(res["links"], coll)
    own_core = res.get("world", 1) <= (res.get("cores") or 1)
    call = measured_call if own_core else 0.0
    flops = [(costs.korthikanti_flops(runs.block_size, b, runs.n_embd, runs.n_layer, runs.vocab_size), k, t)
             for b, k, t in res["compute"]]
    overhead, per_pass, rate = fit_compute(flops)
    out = {"fit": {"collective": coll, "p2p": p2p, "rate": rate, "overhead": overhead, "pass_overhead": per_pass,
                   "call_overhead": call, "call_overhead_measured": measured_call},
           "layouts": {}}
    for name, measured in res["layouts"].items():
        dims = (layouts or CPU_LAYOUTS)[name]
        lay = cpu_layout(runs, name, dims)
        spec, cl = cpu_case(runs, rate, coll, p2p, lay)
        kw = dict(efficiency=1.0, bytes_per_el=4, step_overhead=overhead, pass_overhead=per_pass,
                  buckets=runs.dp_buckets, overlap_dp=CPU_OVERLAP.get(name, 1.0), call_overhead=call,
                  scatter_gather=False,  # our pipeline sends whole activations from every tensor rank
                  vocab_parallel=True)  # and our tensor parallelism splits the embedding, head and loss
        sim = simulate.simulate(spec, cl, lay, **kw)
        out["layouts"][name] = (measured, sim.step, sim.step / measured - 1)
        if call != measured_call:  # what charging the measured wait would have predicted
            kw["call_overhead"] = measured_call
            charged = simulate.simulate(spec, cl, lay, **kw).step
            out.setdefault("charged", {})[name] = (charged, charged / measured - 1)
    return out
