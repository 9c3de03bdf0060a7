"""How long a checkpoint save blocks training: synchronous dcp.save vs asynchronous (stage to CPU memory,
write in a background thread: course.parallel.dcp.AsyncSaver, and PyTorch's dcp.async_save).

Two gloo ranks, an FSDP2-sharded Transformer with its AdamW state (course.parallel.fault_experiments.
save_timing): per save, the seconds the caller waits; medians over --repeats. Target: each asynchronous
save blocks the step for at most half the time a synchronous save does (the write, which is most of a
save, moves to the background; what remains is the copy into memory). The ratio is measured in the same
processes, so a loaded machine slows both sides.

    python benchmarks/checkpoint_save.py [--n-embd 256] [--repeats 3]
Prints one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from course.device import machine_info  # noqa: E402
from course.parallel import launch  # noqa: E402
from course.parallel.fault_experiments import Job, save_timing  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    job = Job(n_embd=args.n_embd, n_layer=args.n_layer, vocab_size=256, block_size=64)
    with tempfile.TemporaryDirectory() as tmp:
        values = launch.run(save_timing, 2, tmp, job, args.repeats, timeout=600, threads=1).values
    r = values[0]
    targets = {f"{name} save: blocked time vs a synchronous save": {
        "target": "<= 0.5x", "measured": r[f"{name}_blocked_s"], "baseline": r["sync_blocked_s"],
        "ratio": r[f"{name}_blocked_s"] / r["sync_blocked_s"], "met": r[f"{name}_blocked_s"] <= 0.5 * r["sync_blocked_s"]}
        for name in ("ours", "torch")}
    out = {"machine": machine_info(),
           "config": {"ranks": 2, "threads_per_rank": 1, "backend": "gloo", **asdict(job), "repeats": args.repeats,
                      "statistic": "median of the repeats, rank 0", "load_average_1min": os.getloadavg()[0]},
           "measured": {"rank0": r, "rank1": values[1]}, "targets": targets,
           "met": all(t["met"] for t in targets.values())}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
