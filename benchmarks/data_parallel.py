"""Data-parallel step time: our bucketed all-reduce (hooks, overlapped with backward) vs torch DDP.

2 ranks, the profile's model, the same bucket size for both, each trained by the one loop
(course.train.train) in alternating rounds (bucketed, DDP, naive, bucketed, ...) so that all see the
same machine load; the minimum step time of rank 0 (course.measure's statistic).
Targets: bucketed within 1.1x of DDP; counted bytes per step = 2(N-1)/N·Ψ·4 (ring all-reduce, fp32).

    python benchmarks/data_parallel.py          # CPU: gloo, 2 ranks
    python benchmarks/data_parallel.py --gpu    # GPU profile, NCCL, needs 2 GPUs (else CPU + a note)
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from course.device import machine_info, profile  # noqa: E402
from course.parallel import launch  # noqa: E402
from course.parallel.experiments import Setup, run_many, time_strategies  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true", help="GPU profile sizes (NCCL when 2+ GPUs)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--bucket-mb", type=float, default=1.0)
    args = ap.parse_args(argv)

    note = None
    prof = profile("gpu" if args.gpu else "cpu")
    if prof.device.type == "cuda" and torch.cuda.device_count() < args.world:
        note = (f"{torch.cuda.device_count()} GPU(s) < {args.world} ranks: NCCL needs one GPU per rank, "
                f"so this ran on the CPU with gloo at CPU sizes")
        prof = profile("cpu")
    steps = args.steps or (20 if prof.name == "gpu" else 8)
    setup = Setup(n_layer=prof.n_layer, n_head=prof.n_head, n_embd=prof.n_embd, vocab_size=256,
                  block_size=prof.block_size, batch_size=prof.batch_size, steps=steps,
                  bucket_mb=args.bucket_mb)
    if note:
        import os
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the spawned ranks then pick gloo on the CPU
    res = launch.run(time_strategies, args.world, setup, ("bucketed", "ddp", "naive"), 3, timeout=900).values[0]
    counts = launch.run(run_many, args.world, replace(setup, steps=3), ("bucketed", "naive"), timeout=900).values[0]

    world = args.world
    psi = res["bucketed"]["psi"]
    formula = 2 * (world - 1) / world * psi * 4  # bytes per rank per step, fp32
    counted = counts["bucketed"]["comm"]["total_bytes"]
    ours, ddp = res["bucketed"]["min_s"], res["ddp"]["min_s"]
    out = {
        "machine": machine_info(),
        "config": {"world": world, "backend": "gloo" if (note or not torch.cuda.is_available()) else "nccl",
                   "profile": prof.name, "n_layer": setup.n_layer, "n_embd": setup.n_embd,
                   "block_size": setup.block_size, "global_batch": setup.batch_size, "params": psi,
                   "bucket_mb": setup.bucket_mb, "timed_steps_per_round": steps, "rounds": 3,
                   "threads_per_rank": max(1, (__import__("os").cpu_count() or 1) // world), "note": note},
        "measured": {"bucketed_step_s": ours, "ddp_step_s": ddp, "naive_step_s": res["naive"]["min_s"],
                     "bucketed_all_reduce_calls": counts["bucketed"]["comm"]["calls"].get("all_reduce", 0),
                     "naive_all_reduce_calls": counts["naive"]["comm"]["calls"].get("all_reduce", 0),
                     "comm_bytes_per_step": counted, "formula_bytes_per_step": formula},
        "targets": {
            "bucketed_step_time_vs_ddp": {"target": "<= 1.1x DDP", "measured": ours, "baseline": ddp,
                                          "ratio": ours / ddp, "met": ours / ddp <= 1.1},
            "comm_bytes_equal_formula": {"target": "2(N-1)/N * params * 4 bytes", "measured": counted,
                                         "baseline": formula, "ratio": counted / formula,
                                         "met": abs(counted - formula) <= 1e-9 * formula},
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
