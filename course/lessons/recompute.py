"""Lesson 04 (activation recomputation): the experiments that measure each policy.

`measure_policies` runs every policy on the same model and batch (memory with LiveTensors, step time
with interleaved rounds), `core_recompute_costs` times the ops a written-out attention core repeats.
The policies themselves live in `course.recompute`; benchmarks/checkpointing.py calls these too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..measure import measure_step, time_it
from ..progress import progress_bar
from ..recompute import apply_policy


@dataclass
class PolicyResult:
    policy: str
    activations: int  # bytes alive at the end of forward (kept for backward), measured
    peak: int  # bytes at the peak of forward + backward (weights, grads and activations), measured
    peak_activations: int  # of which activations & temporaries (not weights or gradients)
    step_time: float  # seconds, forward + backward, min over rounds
    time_ratio: float  # step_time / step_time of the first policy measured (normally "none")
    memory_ratio: float  # activations / activations of the first policy
    step: object = field(default=None, repr=False)  # the course.measure.StepMemory (timeline, breakdown)


def measure_policies(make_model, batch, policies=("none", "full", "every-k:2", "sqrt", "selective"),
                     rounds: int = 3, progress: bool = False, threads: int | None = None) -> list[PolicyResult]:
    """Memory (LiveTensors) and step time of each policy on the same model and batch.

    make_model() builds a fresh model (same seed each call). Policies are "name" or "every-k:K"; a
    "#label" suffix measures a policy again under another name: "none#control" is a second, identical
    model, and its time_ratio shows how much two runs of the same work differ on this machine.
    Timing rounds are interleaved across policies and the minimum is kept (other work on the machine
    only ever adds time), so a busy machine slows every policy alike instead of whichever ran during a
    burst. threads: torch.set_num_threads while timing (1 makes CPU ratios steadier on a shared machine).
    """
    models, mem = {}, {}
    for spec in policies:
        name, k = parse_policy(spec)
        model = apply_policy(make_model(), name, k)
        mem[spec] = measure_step(model, batch)
        models[spec] = model
    times = {spec: [] for spec in policies}
    it = progress_bar(range(rounds + 1), desc="timing rounds", enabled=progress)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for r in it:
            for spec, model in models.items():
                times[spec].append(_one_step(model, batch))
    finally:
        torch.set_num_threads(saved_threads)
    base = policies[0]
    t = {spec: min(v[1:]) for spec, v in times.items()}  # round 0 is warm-up
    return [PolicyResult(spec, mem[spec].activations, mem[spec].peak, mem[spec].at_peak["activations & temporaries"],
                         t[spec], t[spec] / t[base],
                         mem[spec].activations / mem[base].activations, mem[spec]) for spec in policies]


def parse_policy(spec: str) -> tuple[str, int | None]:
    """"every-k:2#label" -> ("every-k", 2); "sqrt" -> ("sqrt", None)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"policy spec must be a non-empty string like 'sqrt' or 'every-k:2', got {spec!r}")
    name, _, k = spec.split("#")[0].partition(":")
    if not k:
        return name, None
    if not k.isdigit():
        raise ValueError(f"policy spec {spec!r}: the part after ':' must be a positive integer k, got {k!r}")
    return name, int(k)


def _one_step(model: nn.Module, batch) -> float:
    def step():
        _, loss = model(*batch)
        loss.backward()
    dt = time_it(step, repeats=1, warmup=0, device=next(model.parameters()).device)
    model.zero_grad(set_to_none=True)
    return dt


def core_recompute_costs(batch: int, n_head: int, seq_len: int, head_size: int, dropout: float = 0.1,
                         device=None, repeats: int = 5) -> dict[str, float]:
    """Milliseconds per call of each op that recomputing a written-out attention core repeats, on
    tensors of one block's shape (scores and probabilities are (B, nh, T, T)). Best of `repeats`.
    On CPU, dropout's mask (bernoulli_, a scalar random-number loop) costs several softmaxes; on a
    GPU it is generated inside the kernel and costs about as much as any pointwise op."""
    if not 0.0 < dropout < 1.0:
        raise ValueError(f"dropout must be in (0, 1), got {dropout!r}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    q, k = (torch.randn(batch, n_head, seq_len, head_size, device=dev) for _ in range(2))
    scores = q @ k.transpose(-2, -1)  # (B, nh, T, T)
    probs = scores.softmax(-1)
    ops = {"QK^T (bmm)": lambda: q @ k.transpose(-2, -1),
           "softmax": lambda: scores.softmax(-1),
           "dropout (mask + scale)": lambda: torch.nn.functional.dropout(probs, dropout, True),
           "attention over V (bmm)": lambda: probs @ q}
    return {name: time_it(fn, repeats=repeats, device=dev) * 1e3 for name, fn in ops.items()}
