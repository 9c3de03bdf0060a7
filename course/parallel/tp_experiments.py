"""Tensor- and sequence-parallel experiments the lesson, tests and benchmark run on N ranks (spawnable).

Every rank builds the same single-process model from the same seed (course.parallel.experiments'
Setup), keeps it as the reference, and splits a copy; each check compares the two on the same input.
The context-parallel experiments live in `course.parallel.cp_experiments`.

    python -m course.parallel.tp_experiments --nproc 2                    # every check, JSON lines
    torchrun --standalone --nproc-per-node=2 -m course.parallel.tp_experiments
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from ..costs import tensor_parallel_bytes
from ..measure import saved_tensors
from ..parallelize import Plan, parallelize
from ..train import train
from . import launch
from ..model import Transformer
from .experiments import Setup, batch_fn, build_model, full_state, reference
from .mesh import Mesh
from .tensor import _block, apply_tensor_parallel


def _world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _split(setup: Setup, sequence_parallel: bool):
    """(reference model, tensor-parallel copy) on this rank, same master weights."""
    ref = build_model(setup)
    return ref, apply_tensor_parallel(copy.deepcopy(ref), Mesh(tensor=_world()[1]), sequence_parallel)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in b)


def _local(full: torch.Tensor, p) -> torch.Tensor:
    """This rank's slice of a whole tensor, the way p was cut (p itself if p is whole)."""
    return full.index_select(p.tp_dim, p.tp_indices[_world()[0]]) if hasattr(p, "tp_dim") else full


def check_block(setup: Setup, sequence_parallel: bool = False) -> dict:
    """One split Block vs the whole Block: output, input and weight gradients, every collective counted."""
    rank, t = _world()
    ref, tp = _split(setup, sequence_parallel)
    B, T, C = setup.batch_size, setup.block_size, setup.n_embd
    g = torch.Generator().manual_seed(setup.seed + 7)
    x = torch.randn(B, T, C, generator=g, dtype=ref.wte.weight.dtype)
    gy = torch.randn(B, T, C, generator=g, dtype=x.dtype)
    xr = x.clone().requires_grad_()
    ref.blocks[0](xr).backward(gy)
    mine = slice(rank * T // t, (rank + 1) * T // t) if sequence_parallel else slice(None)
    xl = x[:, mine].clone().requires_grad_()
    comm = tp.tp_comm
    comm.reset()
    y = tp.blocks[0](xl)  # (B, T, C), or (B, T/t, C) under sequence parallelism
    forward = {"calls": dict(comm.calls), "bytes": comm.total_bytes}
    comm.reset()
    y.backward(gy[:, mine])
    backward = {"calls": dict(comm.calls), "bytes": comm.total_bytes, "by_op": dict(comm.bytes),
                "names": sorted({name for kind, name, *_ in comm.spans})}
    ref_params = dict(ref.blocks[0].named_parameters())
    weights = max((p.grad - _local(ref_params[n].grad, p)).abs().max().item()
                  for n, p in tp.blocks[0].named_parameters())
    formula = tensor_parallel_bytes(B, T, C, t, bytes_per_el=x.element_size(), sequence_parallel=sequence_parallel)
    return {"output": (y - ref.blocks[0](x)[:, mine]).abs().max().item(),
            "input_grad": (xl.grad - xr.grad[:, mine]).abs().max().item(), "weight_grads": weights,
            "forward": forward, "backward": backward, "formula": formula,
            "param_grad_calls": dict(tp.tp_param_comm.calls)}


def check_model(setup: Setup, sequence_parallel: bool = False) -> dict:
    """The whole model: logits (gathered for the check), vocabulary-parallel loss, every gradient."""
    ref, tp = _split(setup, sequence_parallel)
    x, y = batch_fn(setup)("train")
    logits, loss = ref(x, y)
    loss.backward()
    tp.tp_comm.reset()
    tp_logits, tp_loss = tp(x, y)
    forward = dict(tp.tp_comm.calls)
    tp.tp_comm.reset()
    tp_loss.backward()
    return {"loss": tp_loss.item(), "reference_loss": loss.item(), "logits_shape": list(tp_logits.shape),
            "logits": (tp.full_logits(tp_logits) - logits).abs().max().item(),
            "grads": _max_diff(tp.full_grads(), {n: p.grad for n, p in ref.named_parameters()}),
            "forward_calls": forward, "backward_calls": dict(tp.tp_comm.calls)}


def check_memory(setup: Setup, dropout: float = 0.0) -> dict:
    """Bytes one Block saves for backward on this rank: whole, tensor parallel, sequence parallel
    (course.measure.saved_tensors, forward only), by module. Setup.dtype: float32 for the formulas."""
    s = replace(setup, dtype="float32")
    out = {}
    for label, sp in (("whole", None), ("tensor", False), ("sequence", True)):
        torch.manual_seed(s.seed)
        model = Transformer(s.model_config().replace(dropout=dropout))
        if sp is not None:
            model = apply_tensor_parallel(model, Mesh(tensor=_world()[1]), sp)
        x, y = batch_fn(s)("train")
        report, _ = saved_tensors(model, lambda: model(x, y)[1])
        out[label] = {"block": report.under("blocks.0"), "by_module": report.by_module()}
    return out


def check_dtensor(setup: Setup, sequence_parallel: bool = False) -> dict:
    """PyTorch's own: parallelize_module with ColwiseParallel / RowwiseParallel (and SequenceParallel on
    the LayerNorms) on a DeviceMesh, applied to the same Block: output and gradients vs the whole Block."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)
    from .tensor import ParallelSelfAttention
    rank, t = _world()
    ref = build_model(setup).blocks[0]
    block = copy.deepcopy(ref)
    C = setup.n_embd
    perm = torch.cat([_block(3 * C, t, 3)(r) for r in range(t)])  # rank-major [q_r k_r v_r]: DTensor cuts rows evenly
    with torch.no_grad():
        block.attn.c_attn.weight.copy_(ref.attn.c_attn.weight[perm])
        block.attn.c_attn.bias.copy_(ref.attn.c_attn.bias[perm])
    a = block.attn
    a.full_heads, a.n_head, a.head_offset = a.n_head, a.n_head // t, rank * a.n_head // t
    a.__class__ = ParallelSelfAttention  # local widths; the linears stay nn.Linear for DTensor to split
    plan = {"attn.c_attn": ColwiseParallel(), "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(), "mlp.c_proj": RowwiseParallel()}
    if sequence_parallel:
        plan.update({"ln_1": SequenceParallel(), "ln_2": SequenceParallel(),
                     "attn": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
                     "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
                     "attn.c_proj": RowwiseParallel(output_layouts=Shard(1)),
                     "mlp.c_proj": RowwiseParallel(output_layouts=Shard(1))})
    parallelize_module(block, Mesh(tensor=t).device_mesh(launch.rank_device().type)["tensor"], plan)
    B, T = setup.batch_size, setup.block_size
    g = torch.Generator().manual_seed(setup.seed + 7)
    x = torch.randn(B, T, C, generator=g, dtype=ref.ln_1.weight.dtype)
    gy = torch.randn(B, T, C, generator=g, dtype=x.dtype)
    xr = x.clone().requires_grad_()
    ref(xr).backward(gy)
    mine = slice(rank * T // t, (rank + 1) * T // t) if sequence_parallel else slice(None)
    xl = x[:, mine].clone().requires_grad_()
    y = block(xl)
    y.backward(gy[:, mine])
    grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for n, p in block.named_parameters()}
    for n in ("attn.c_attn.weight", "attn.c_attn.bias"):
        unpermuted = torch.empty_like(grads[n])
        unpermuted[perm] = grads[n]
        grads[n] = unpermuted
    return {"output": (y - ref(x)[:, mine]).abs().max().item(), "input_grad": (xl.grad - xr.grad[:, mine]).abs().max().item(),
            "weight_grads": _max_diff(grads, {n: p.grad for n, p in ref.named_parameters()})}


def train_tp(setup: Setup, sequence_parallel: bool = False, recompute: str = "none") -> dict:
    """`setup.steps` steps of course.train.train with Plan(tensor_parallel=True): parameters, losses and
    gradient norms vs one process training the whole model on the same batches."""
    ref = reference(replace(setup, recompute=recompute))
    plan = Plan(tensor_parallel=True, sequence_parallel=sequence_parallel, recompute=recompute)
    model = parallelize(build_model(setup), plan, mesh=Mesh(tensor=_world()[1]))
    hist = train(model, batch_fn(setup), setup.train_config())
    return {"max_abs_diff": _max_diff(full_state(model), ref["state"]), "losses": hist.train_loss,
            "reference_losses": ref["losses"], "grad_norms": hist.grad_norm, "reference_grad_norms": ref["grad_norms"]}


def shard_table(setup: Setup) -> list[dict]:
    """Name, local shape, split dimension and owned indices of every parameter on this rank (for pictures)."""
    _, tp = _split(setup, False)
    return [{"name": n, "shape": list(p.shape), "dim": getattr(p, "tp_dim", None),
             "indices": p.tp_indices[_world()[0]].tolist() if hasattr(p, "tp_dim") else None}
            for n, p in tp.named_parameters()]


def bad_inputs(setup: Setup) -> dict:
    """The errors a rank raises for inputs the split cannot take (message per case)."""
    out = {}
    _, tp = _split(setup, True)
    x = torch.zeros(1, _world()[1] + 1, dtype=torch.long)  # T = t + 1 tokens: no equal sequence shards
    try:
        tp(x, x)
    except ValueError as e:
        out["sequence_length"] = str(e)
    return out


def tp_checks(setup: Setup, dtensor: bool = True, recompute: bool = True) -> dict:
    """Everything the tests check, in one launch (spawning ranks costs seconds, a check milliseconds).
    dtensor: also PyTorch's parallelize_module (its first use imports and warms up DTensor: seconds)."""
    out = {"shards": shard_table(setup), "memory": check_memory(setup), "memory_dropout": check_memory(setup, 0.1),
           "bad_inputs": bad_inputs(setup)}
    for sp, label in ((False, "tensor"), (True, "sequence")):
        out[label] = {"block": check_block(setup, sp), "model": check_model(setup, sp), "train": train_tp(setup, sp)}
        if dtensor:
            out[label]["dtensor"] = check_dtensor(setup, sp)
    if recompute:
        out["tensor"]["train_recompute"] = train_tp(setup, False, recompute="full")
    return out


def time_split_vs_whole(setup: Setup, rounds: int = 5) -> dict:
    """Step times on the same machine load, in alternating rounds: the model split by tensor and by sequence
    parallelism (every rank), and the whole model on rank 0 alone with the same threads per process (the
    other ranks wait at a barrier). Per split, the share of its steps spent in collectives (Comm's timeline)."""
    rank, t = _world()
    splits = {sp: parallelize(build_model(setup), Plan(tensor_parallel=True, sequence_parallel=sp),
                              mesh=Mesh(tensor=t)) for sp in (False, True)}
    whole = build_model(setup)
    times = {"tensor": [], "sequence": [], "whole": []}
    shares = {"tensor": [], "sequence": []}
    for _ in range(rounds):
        for sp, model in splits.items():
            name = "sequence" if sp else "tensor"
            steps, share = _time(model, setup, model.tp_comm)
            times[name] += steps
            shares[name].append(share)
        dist.barrier()
        if rank == 0:
            times["whole"] += _time(whole, setup)[0]
        dist.barrier()
    out = {k: {"min_step_s": min(v), "step_s": v} for k, v in times.items() if v}
    for k, v in shares.items():
        out[k]["comm_share"] = min(v)
    return out


def _time(model, setup, comm=None):
    """Step times after the first (warm-up) step, and the share of steps 1..n-2 spent in comm's collectives."""
    cfg = replace(setup.train_config(), eval_interval=10**9)  # evaluates at the first and last step only
    mark = {}

    def hook(event, state):
        if event == "after_step" and state.step in (0, cfg.max_steps - 2) and comm is not None:
            if state.step == 0:
                comm.reset()
                mark["start"] = time.perf_counter()
            else:
                spent = sum(e - s for kind, _, s, e in comm.spans if kind == "comm")
                mark["share"] = spent / (time.perf_counter() - mark["start"])
    if dist.is_initialized() and comm is not None:
        dist.barrier()
    hist = train(model, batch_fn(setup), cfg, hooks=[hook])
    steps = [setup.batch_size * setup.block_size / tps for tps in hist.tokens_per_s[1:]]
    return steps, mark.get("share")


def benchmark_two_ranks(setup: Setup, rounds: int = 5) -> dict:
    """What benchmarks/model_parallel.py measures on the tensor-parallel ranks, in one launch (float32)."""
    s = replace(setup, dtype="float32")
    return {"time": time_split_vs_whole(s, rounds),
            "block": {"tensor": check_block(s, False), "sequence": check_block(s, True)},
            "memory": check_memory(s, dropout=0.1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    args = ap.parse_args(argv)
    setup = Setup(n_head=4, dtype="float64")
    values = launch.main(tp_checks, setup, nproc=args.nproc)
    if launch.under_torchrun() and int(os.environ["RANK"]) != 0:
        return
    r = values[0]
    for label in ("tensor", "sequence"):
        print(json.dumps({"parallelism": label, "block": {k: r[label]["block"][k] for k in ("output", "input_grad", "weight_grads")},
                          "model_loss_diff": abs(r[label]["model"]["loss"] - r[label]["model"]["reference_loss"]),
                          "train_max_abs_diff": r[label]["train"]["max_abs_diff"], "setup": asdict(setup)}))


if __name__ == "__main__":
    main()
