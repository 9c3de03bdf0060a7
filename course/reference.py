"""Recorded GPU benchmark results (benchmarks/reference/*.json, written by benchmarks/run_gpu.sh).

Lessons show these beside their live CPU measurement. Nothing here is typed in by hand: a file
is the unedited output of a run, with the GPU name, torch version and date it was recorded on.
"""
from __future__ import annotations

import json
from pathlib import Path

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "reference"


def gpu_references() -> list[dict]:
    """Every recorded run, newest first: {"recorded": {gpu, torch, date}, "results": {...}}."""
    runs = []
    for path in sorted(REFERENCE_DIR.glob("*.json")):
        run = json.loads(path.read_text())
        if "recorded" not in run or "results" not in run:
            raise ValueError(f"{path}: not a run_gpu.sh record (needs 'recorded' and 'results')")
        runs.append(run)
    return sorted(runs, key=lambda r: r["recorded"].get("date", ""), reverse=True)


def gpu_reference(benchmark: str) -> dict | None:
    """The newest recorded GPU result of one benchmark, with where it came from; None if none."""
    for run in gpu_references():
        if benchmark in run["results"]:
            return {"recorded": run["recorded"], **run["results"][benchmark]}
    return None


def describe(benchmark: str) -> str:
    """One line for a lesson: what the GPU reference is, or that none is recorded."""
    ref = gpu_reference(benchmark)
    if ref is None:
        return (f"No GPU reference recorded for {benchmark!r} yet: run benchmarks/run_gpu.sh on a GPU "
                f"and copy its gpu-reference.json into benchmarks/reference/.")
    r = ref["recorded"]
    return f"GPU reference for {benchmark!r}: {r['gpu']}, torch {r['torch']}, recorded {r['date']}."
