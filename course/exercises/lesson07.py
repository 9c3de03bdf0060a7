"""Lesson 07 (pipeline parallelism): a 1F1B schedule as data, and the pipeline bubble.

A schedule is data (as torchtitan's pipeline schedules are): for each stage, the list of actions it
runs in order, ("F", i) for the forward of micro-batch i and ("B", i) for its backward.
1F1B (PipeDream-Flush; Narayanan et al. 2021, "Efficient large-scale language model training on GPU
clusters using Megatron-LM", section 2.2): stage s of p first runs p - s - 1 warm-up forwards, then
alternates one forward and one backward, then drains the remaining backwards; it keeps at most p - s
micro-batches' activations, where GPipe (Huang et al. 2019: all forwards, then all backwards) keeps m.

The reference schedule is the library's (`course.parallel.schedules.one_f_one_b`); `simulate` below runs per-stage action lists
against their dependencies (F(i) on stage s after F(i) on s - 1; B(i) on s after B(i) on s + 1, or
after F(i) on the last stage) with forward time tf and backward time tb, and reports the makespan.
The bubble exercise is checked against this simulation, not against a formula (tests/test_exercises.py
also checks it against course.parallel.schedules.simulate).
"""
from __future__ import annotations

from .core import Hint, call, close, exercise


def _one_f_one_b(n_stages, n_micro, stage):
    """Reference solution: lesson 07's own generator (course.parallel.schedules.one_f_one_b: warm-up
    forwards, steady one-forward-one-backward, cool-down backwards), as (kind, micro-batch) pairs."""
    from ..parallel.schedules import one_f_one_b
    return [(a.kind, a.mb) for a in one_f_one_b(n_stages, n_micro).compute(stage)]


def gpipe(n_stages, n_micro, stage):
    """GPipe: every forward, then every backward."""
    return [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]


def simulate(schedules: list[list[tuple[str, int]]], tf: float = 1.0, tb: float = 2.0) -> float:
    """Makespan of per-stage action lists run as early as their dependencies allow.
    Raises ValueError naming the stuck stages if the schedule deadlocks."""
    p = len(schedules)
    done: dict[tuple[str, int, int], float] = {}  # (kind, micro-batch, stage) -> finish time
    free, nxt = [0.0] * p, [0] * p
    while any(nxt[s] < len(schedules[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if nxt[s] == len(schedules[s]):
                continue
            kind, i = schedules[s][nxt[s]]
            dep = (("F", i, s - 1) if s > 0 else None) if kind == "F" else \
                  (("B", i, s + 1) if s < p - 1 else ("F", i, s))
            if dep is not None and dep not in done:
                continue
            start = max(free[s], done[dep] if dep else 0.0)
            free[s] = done[(kind, i, s)] = start + (tf if kind == "F" else tb)
            nxt[s] += 1
            progressed = True
        if not progressed:
            stuck = {s: schedules[s][nxt[s]] for s in range(p) if nxt[s] < len(schedules[s])}
            raise ValueError(f"the schedule deadlocks: each stage waits, next actions {stuck}")
    return max(free)


def _validate(actions, n_stages, n_micro, stage, what) -> None:
    if not isinstance(actions, (list, tuple)) or not all(
            isinstance(a, (list, tuple)) and len(a) == 2 and a[0] in ("F", "B") for a in actions):
        raise Hint(f"{what} should return a list of ('F', i) and ('B', i) pairs")
    for kind in "FB":
        ids = [i for k, i in actions if k == kind]
        if sorted(ids) != list(range(n_micro)):
            raise Hint(f"{what}: every micro-batch 0..{n_micro - 1} needs exactly one {kind}, yours has {kind} of {ids}")
        if ids != sorted(ids):
            raise Hint(f"{what}: {'forwards' if kind == 'F' else 'backwards'} must run in micro-batch order, got {ids}")
    seen = set()
    in_flight = peak = 0
    for kind, i in actions:
        if kind == "B" and i not in seen:
            raise Hint(f"{what}: the backward of micro-batch {i} comes before its forward")
        seen.add(i)
        in_flight += 1 if kind == "F" else -1
        peak = max(peak, in_flight)
    if peak > n_stages - stage:
        raise Hint(f"{what} keeps {peak} micro-batches' activations at once: 1F1B starts backwards early so stage "
                   f"{stage} holds at most p - s = {n_stages - stage} (this looks like GPipe's all-forward-then-all-backward)"
                   if peak == n_micro else
                   f"{what} keeps {peak} micro-batches' activations at once; 1F1B holds at most p - s = {n_stages - stage}")


@exercise("07", "one_f_one_b", solution=_one_f_one_b)
def check_one_f_one_b(fn, rng, gen):
    """one_f_one_b(n_stages, n_micro, stage) -> the 1F1B action list of one stage: ("F", i) / ("B", i)."""
    cases = [(4, 8), (4, 2), (2, 1), (3, 5)] + [(rng.randint(2, 6), rng.randint(1, 12)) for _ in range(3)]
    for p, m in cases:
        for s in range(p):
            what = f"one_f_one_b(n_stages={p}, n_micro={m}, stage={s})"
            actions = call(fn, p, m, s, describe=what)
            _validate(actions, p, m, s, what)
            actions = [(k, int(i)) for k, i in actions]
            want = _one_f_one_b(p, m, s)
            if actions != want:
                lead = lambda acts: next((j for j, (k, _) in enumerate(acts) if k == "B"), len(acts))
                if lead(actions) != lead(want):
                    raise Hint(f"{what} runs {lead(actions)} forwards before its first backward, expected "
                               f"{lead(want)}: min(p - s - 1, m) = {min(p - s - 1, m)} warm-up forwards, then one "
                               f"forward and one backward in turn, then the remaining backwards")
                raise Hint(f"{what} gave {actions}, expected {want}")
    return f"{len(cases)} (stages, micro-batches) pairs, every stage"


def _bubble_fraction(n_stages, n_micro):
    """Reference solution: GPipe's idle share of the total time (Huang et al. 2019)."""
    return (n_stages - 1) / (n_micro + n_stages - 1)


@exercise("07", "bubble_fraction", solution=_bubble_fraction)
def check_bubble_fraction(fn, rng, gen):
    """bubble_fraction(n_stages, n_micro) -> the share of the pipeline's total time a stage sits idle
    under GPipe, compared with a simulated run (forward 1, backward 2 time units)."""
    cases = [(1, 4), (4, 1), (4, 8), (8, 32)] + [(rng.randint(2, 16), rng.randint(1, 64)) for _ in range(4)]
    for p, m in cases:
        tf, tb = 1.0, 2.0
        total = simulate([gpipe(p, m, s) for s in range(p)], tf, tb)
        measured = 1 - m * (tf + tb) / total  # every stage is busy m (tf + tb) of the total
        got = call(fn, p, m)
        if not isinstance(got, (int, float)) or isinstance(got, bool):
            raise Hint(f"bubble_fraction({p}, {m}) should return a number, got {type(got).__name__}")
        if close(got, measured, 1e-12, 1e-12):  # integer times: the simulation is exact
            continue
        if m > 0 and close(got, (p - 1) / m, 1e-12, 1e-12):
            raise Hint(f"bubble_fraction({p}, {m}) = {got:.4f} is the idle time relative to the busy time; the "
                       f"share of the TOTAL time is idle / (idle + busy) = {measured:.4f} in the simulation")
        raise Hint(f"bubble_fraction({p}, {m}) = {got!r}; a simulated GPipe run is idle {measured:.4f} of the "
                   f"time: a stage waits while the pipe fills (p - 1 forward slots) and drains (p - 1 backward slots)")
    return f"{len(cases)} (stages, micro-batches) pairs against a simulated pipeline"
