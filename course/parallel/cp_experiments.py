"""Context-parallel experiments the lesson, tests and benchmark run on N ranks (importable: spawnable).

Every rank draws the same full q, k, v (one seed), keeps its tokens, and compares ring attention or
Ulysses with attention over the whole sequence on one rank (`MatmulAttention`: written out, any mask).

    python -m course.parallel.cp_experiments --nproc 4
    torchrun --standalone --nproc-per-node=4 -m course.parallel.cp_experiments
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from ..measure import LiveTensors, saved_tensors
from ..model import MatmulAttention, SDPAttention
from ..parallelize import Plan, parallelize
from ..train import train
from . import launch
from .comm import Comm
from .context import apply_context_parallel, ring_attention, shard_sequence
from .experiments import Setup, batch_fn, build_model, full_state, reference
from .ulysses import UlyssesAttention

PATTERNS = ("causal", "sliding_window", "dilated", "longformer", "bigbird", "strided")


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def make_pattern(name: str, T: int, block: int):
    """A chapter-03 pattern over T tokens (causal), sized so a local window fits in one rank's shard."""
    from .. import sparse
    if name == "causal":
        return sparse.causal(T, block)
    if name == "sliding_window":
        return sparse.sliding_window(T, window=block, block_size=block, causal=True)
    if name == "dilated":
        return sparse.dilated(T, window=2, dilation=block // 2, block_size=block, causal=True)
    if name == "longformer":
        return sparse.longformer(T, window=block, n_global=block // 2, block_size=block, causal=True)
    if name == "bigbird":
        return sparse.bigbird(T, block_size=block, causal=True)
    if name == "strided":
        return sparse.strided(T, stride=2 * block, block_size=block)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {name!r}")


def _inputs(B, H, T, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) for _ in range(4)]  # q, k, v, dout


def check_attention(B=2, H=4, T=32, D=8, layout="zigzag", causal=True, method="ring", pattern=None, block=4) -> dict:
    """Ring attention (or Ulysses) on this rank's tokens vs attention over the whole sequence, forward and
    backward; the bytes sent, the ring's work counts and its timeline."""
    rank, w = _world()
    q, k, v, dout = _inputs(B, H, T, D)
    pat = make_pattern(pattern, T, block) if pattern else None
    mask = pat.dense_mask(H).unsqueeze(0) if pat else None  # (1, H, T, T)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = MatmulAttention()(*full, causal=causal or bool(pat and pat.causal), attn_mask=mask)
    ref.backward(dout)
    mine = [shard_sequence(t, rank, w, layout, dim=2).requires_grad_() for t in (q, k, v)]
    comm, stats = Comm(name="context"), {}
    if dist.is_initialized():
        dist.barrier()  # start together: the timeline shows the ring, not the ranks' skew
    if method == "ring":
        out = ring_attention(*mine, comm, causal=causal, layout=layout, pattern=pat, stats=stats)
    else:
        out = UlyssesAttention(comm, SDPAttention())(*mine, causal=causal, attn_mask=mask)  # whole sequence: whole mask
    forward = comm.summary()
    n_fwd_spans = len(comm.spans)
    out.backward(shard_sequence(dout, rank, w, layout, dim=2))
    diffs = {"out": (out - shard_sequence(ref, rank, w, layout, dim=2)).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), mine, full):
        diffs[name] = (a.grad - shard_sequence(b.grad, rank, w, layout, dim=2)).abs().max().item()
    return {"diffs": diffs, "stats": stats, "forward": forward, "total": comm.summary(),
            "spans": comm.spans, "forward_spans": n_fwd_spans}


def attention_memory(B, H, T, D, layout="zigzag", dtype=torch.float32, peak: bool = True) -> dict:
    """Bytes ring attention keeps for backward on this rank (saved_tensors) and, if `peak`, its peak live
    bytes over forward + backward (LiveTensors, inputs excluded); on one rank (world 1): whole attention
    written out. (The first point-to-point op under a TorchDispatchMode imports torch._dynamo: seconds.)"""
    rank, w = _world()
    q, k, v, dout = (shard_sequence(t, rank, w, layout, dim=2).contiguous() for t in _inputs(B, H, T, D, dtype))
    for t in (q, k, v):
        t.requires_grad_()
    comm = Comm(name="context")

    def attend():
        if w == 1:
            return MatmulAttention()(q, k, v, causal=True)
        return ring_attention(q, k, v, comm, causal=True, layout=layout)
    report, out = saved_tensors(nn.Module(), attend)
    saved = report.total
    del out
    if not peak:
        return {"saved": saved, "T": T, "world": w}
    with LiveTensors() as live:
        attend().backward(dout)
    return {"saved": saved, "peak": live.peak, "T": T, "world": w}


def memory_sweep(B, H, D, lengths, layouts=("contiguous", "zigzag")) -> dict:
    """attention_memory at every length, for each layout (one launch)."""
    return {layout: [attention_memory(B, H, T, D, layout) for T in lengths] for layout in layouts}


def train_cp(setup: Setup, method: str = "ring", layout: str = "zigzag", ref: dict | None = None) -> dict:
    """`setup.steps` steps of course.train.train with every sequence split over the ranks (ring attention or
    Ulysses, gradients averaged over the same ranks) vs one process training on whole sequences."""
    rank, w = _world()
    ref = ref or reference(setup)
    model = apply_context_parallel(build_model(setup), Comm(name="context"), layout, method)
    grads = Comm(name="context (gradients)")
    model = parallelize(model, Plan(data_parallel="naive"), comm=grads)
    whole = batch_fn(setup)

    def fn(split):  # this rank's tokens of the same batch one process sees
        return tuple(shard_sequence(t, rank, w, layout) for t in whole(split))
    hist = train(model, fn, setup.train_config(), comm=grads)
    return {"max_abs_diff": max((full_state(model)[n] - p).abs().max().item() for n, p in ref["state"].items()),
            "losses": hist.train_loss, "reference_losses": ref["losses"],
            "grad_norms": hist.grad_norm, "reference_grad_norms": ref["grad_norms"]}


def bad_inputs(setup: Setup) -> dict:
    """Errors for a model or sequence the split cannot take."""
    rank, w = _world()
    out = {}
    try:
        apply_context_parallel(build_model(replace(setup, n_head=w + 1, n_embd=(w + 1) * 4)), Comm(), "contiguous",
                               "ulysses")
    except ValueError as e:
        out["heads"] = str(e)
    try:
        ring_attention(*_inputs(1, 1, 2 * w + 1, 2)[:3], Comm(), layout="zigzag")  # odd: no 2N equal chunks
    except ValueError as e:
        out["sequence_length"] = str(e)
    return out


def cp_checks(setup: Setup, patterns=PATTERNS) -> dict:
    """Everything the tests check, in one launch."""
    out = {"attention": {}, "patterns": {}, "bad_inputs": bad_inputs(setup)}
    for layout in ("contiguous", "zigzag"):
        for causal in (True, False):
            out["attention"][f"ring {layout} causal={causal}"] = check_attention(layout=layout, causal=causal)
    for causal in (True, False):
        out["attention"][f"ulysses causal={causal}"] = check_attention(layout="contiguous", causal=causal, method="ulysses")
    for name in patterns:
        out["patterns"][name] = check_attention(T=64, layout="contiguous", pattern=name, block=8)
    out["memory"] = attention_memory(2, 4, 64, 8, peak=False)
    ref = reference(setup)
    out["train"] = {m: train_cp(setup, m, layout, ref) for m, layout in (("ring", "zigzag"), ("ulysses", "contiguous"))}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=4, help="ranks to spawn (ignored under torchrun)")
    args = ap.parse_args(argv)
    setup = Setup(n_head=4, dtype="float64", block_size=32)
    values = launch.main(cp_checks, setup, nproc=args.nproc)
    if launch.under_torchrun() and int(os.environ["RANK"]) != 0:
        return
    r = values[0]
    for name, c in {**r["attention"], **{f"ring + {k}": v for k, v in r["patterns"].items()}}.items():
        print(json.dumps({"check": name, "max_abs_diff": max(c["diffs"].values()), "stats": c["stats"] or None}))
    for name, t in r["train"].items():
        print(json.dumps({"check": f"train {name}", "max_abs_diff": t["max_abs_diff"], "setup": asdict(setup)}))


if __name__ == "__main__":
    main()
