"""Throughput levers of lesson 09, measured in one process: tokens/s of a baseline training
configuration and of each lever changed alone (data format, prefetch under slow storage, batch size,
gradient accumulation, precision), plus the time to prepare one batch and to start.

    python benchmarks/throughput_levers.py                 # about a minute on 2 quiet cores
    python benchmarks/throughput_levers.py --steps 20 --rounds 3

Every configuration trains the same small model with course.train.train; they run round-robin
`--rounds` times so drift in machine load hits all alike, and each keeps its best step (other work
only ever adds time). Targets, each a ratio against a row of the same run:
- prefetch hides slow storage: prefetch / synchronous tokens/s under the same latency > 1;
- the memory-mapped file prepares a batch at most as slowly as tokenizing on the fly (ratio <= 1);
- opening the token file is faster than tokenizing the corpus (ratio < 1).
The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from course.device import machine_info  # noqa: E402
from course.lessons import throughput as tp  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    args = ap.parse_args(argv)
    rows = tp.levers(steps=args.steps, rounds=args.rounds, latency_s=args.latency_ms / 1e3)
    times = tp.batch_times()
    print(tp.levers_table(rows, times))
    by = {r["lever"]: r["tokens_per_s"] for r in rows}
    slow = [k for k in by if k.startswith("slow storage")]
    targets = {
        "prefetch_over_synchronous": {"ratio": by[slow[1]] / by[slow[0]], "target": "> 1"},
        "memmap_over_on_the_fly_batch_time": {
            "ratio": times["batch: memory-mapped file"] / times["batch: tokenize on the fly"], "target": "<= 1"},
        "open_memmap_over_tokenize_startup": {
            "ratio": times["startup: open the memory-mapped file"] / times["startup: tokenize the corpus"],
            "target": "< 1"},
    }
    out = {"benchmark": "throughput_levers", "machine": machine_info(), "config": vars(args),
           "levers": rows, "seconds": times, "targets": targets}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
