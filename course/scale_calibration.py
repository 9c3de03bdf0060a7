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
