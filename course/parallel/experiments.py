"""Data-parallel experiments the lesson, the tests and the benchmark run on N ranks (importable: spawnable).

Every experiment trains the shared course.model.Transformer with the one loop (`course.train.train`)
after `course.parallelize`, with the same seed on every rank and the same global batch each step
(rank r trains on rows r*B/N..(r+1)*B/N of every micro-batch), so its result can be compared with
one process training on the full batch with the same recipe (`reference`).

    python -m course.parallel.experiments --nproc 2             # every strategy vs one process
    torchrun --standalone --nproc-per-node=2 -m course.parallel.experiments   # the same, by torchrun
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from functools import partial

import torch
import torch.distributed as dist

from ..measure import state_bytes
from ..model import ModelConfig, Transformer
from ..parallelize import Plan, parallelize
from ..train import TrainConfig, train, unwrap
from . import launch
from .comm import Comm
from .data_parallel import shard_batch

STRATEGIES = ("naive", "bucketed", "zero1", "zero2", "zero3", "ddp", "fsdp2")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Setup:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    vocab_size: int = 64
    block_size: int = 16
    batch_size: int = 8  # global batch (sequences per optimizer step, all ranks together)
    micro_batches: int = 1  # gradient accumulation: micro-batches per step
    steps: int = 3
    lr: float = 1e-3
    warmup_steps: int = 1
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    bucket_mb: float = 0.02
    seed: int = 0
    data: str = "random"  # "random" tokens or "text" (course.data, char tokenizer)
    dtype: str = "float32"  # "float64" for equality tests: the claim is mathematical equality
    recompute: str = "none"  # a course.recompute policy, applied before sharding
    attention: str = "sdpa"  # or "block-sparse": a local + global block layout (course.sparse)
    sync_every_micro_batch: bool = False  # True: all-reduce after every micro-batch (no no_sync)

    def __post_init__(self):
        if self.data not in ("random", "text"):
            raise ValueError(f"Setup.data must be 'random' or 'text', got {self.data!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Setup.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "batch_size", "micro_batches",
                     "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Setup.{name} must be a positive integer, got {v!r}")
        if self.batch_size % self.micro_batches:
            raise ValueError(f"Setup.batch_size ({self.batch_size}) must be divisible by micro_batches "
                             f"({self.micro_batches})")
        if self.attention not in ("sdpa", "block-sparse"):
            raise ValueError(f"Setup.attention must be 'sdpa' or 'block-sparse', got {self.attention!r}")
        self.train_config()  # lr, warmup, decay, clipping checked by TrainConfig

    def model_config(self) -> ModelConfig:
        vocab = self.vocab_size
        if self.data == "text":
            from ..data import load_dataset
            vocab = load_dataset("char").tokenizer.vocab_size
        return ModelConfig.gpt(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                               vocab_size=vocab, block_size=self.block_size)

    def train_config(self) -> TrainConfig:
        """The one recipe, for one process and for every layout: evaluated at the first and last step."""
        return TrainConfig(max_steps=self.steps, batch_size=self.batch_size // self.micro_batches,
                           block_size=self.block_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, grad_accum=self.micro_batches,
                           eval_interval=self.steps, eval_iters=1, seed=self.seed, progress=False,
                           no_sync=not self.sync_every_micro_batch)

    def plan(self, strategy: str) -> Plan:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        kind = {"shard": strategy} if strategy in ("zero1", "zero2", "zero3", "fsdp2") else {"data_parallel": strategy}
        return Plan(attention=self.attention_core(), recompute=self.recompute, bucket_mb=self.bucket_mb, **kind)

    def attention_core(self):
        """None (the model's SDPA) or a picklable make_core(i) for course.parallelize."""
        if self.attention == "sdpa":
            return None
        return partial(_sparse_core, self.block_size, max(1, self.block_size // 4))

    def check(self, world: int) -> None:
        shard_batch(torch.empty(self.batch_size // self.micro_batches), 0, world)  # raises if it cannot split


def _sparse_core(seq_len: int, block: int, layer: int):
    """Block-sparse attention with a 1-block window and 1 global block (every layer the same)."""
    from ..sparse import BlockSparseAttention, longformer
    return BlockSparseAttention(longformer(seq_len, window=block, n_global=block, block_size=block))


def batch_fn(setup: Setup, rank: int = 0, world: int = 1):
    """batch_fn(split) for course.train: micro-batch k of the run (a fixed function of seed, split and k),
    rows rank*b..(rank+1)*b of it. With world=1 it is the full micro-batch one process trains on."""
    counters = {"train": 0, "val": 0}
    micro = setup.batch_size // setup.micro_batches
    device = launch.rank_device()

    def fn(split: str):
        k = counters[split]
        counters[split] += 1
        g = torch.Generator().manual_seed(setup.seed * 1_000_003 + (split == "val") * 500_009 + k)
        if setup.data == "text":
            from ..data import load_dataset
            x, y = load_dataset("char").batch(split, micro, setup.block_size, generator=g)
        else:
            tokens = torch.randint(setup.vocab_size, (micro, setup.block_size + 1), generator=g)
            x, y = tokens[:, :-1], tokens[:, 1:]
        return shard_batch(x, rank, world).to(device), shard_batch(y, rank, world).to(device)
    return fn


def build_model(setup: Setup) -> Transformer:
    torch.manual_seed(setup.seed)
    return Transformer(setup.model_config()).to(device=launch.rank_device(), dtype=DTYPES[setup.dtype])


def reference(setup: Setup) -> dict:
    """One process, full batch, the same recipe: parameters, per-step losses and gradient norms to match.

    Adam is nearly blind to the gradient's scale, so a summed instead of averaged gradient would
    barely move the parameters: the gradient norm is compared too."""
    model = parallelize(build_model(setup), Plan(attention=setup.attention_core(), recompute=setup.recompute))
    hist = train(model, batch_fn(setup), setup.train_config())
    return {"state": {n: p.detach().clone() for n, p in model.named_parameters()},
            "losses": hist.train_loss, "grad_norms": hist.grad_norm}


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter whole, by name, whatever wrapped or sharded the model."""
    if hasattr(model, "full_state_dict"):
        return model.full_state_dict()
    inner = unwrap(model)
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in inner.named_parameters()}


def _instrument(model, comm: Comm) -> None:
    """Forward and backward spans on comm's timeline (backward: first to last gradient), from outside."""
    inner, marks = unwrap(model), {}
    inner.register_forward_pre_hook(lambda m, a: marks.__setitem__("fwd", comm.now()))

    def after_forward(m, a, out):
        comm.spans.append(("compute", "forward", marks["fwd"], comm.now()))
        if out[1] is not None and out[1].requires_grad:  # training: backward starts at the loss
            out[1].register_hook(lambda g: marks.__setitem__("bwd", comm.now()))
    inner.register_forward_hook(after_forward)
    last = [p for p in inner.parameters() if p.requires_grad][0]  # wte: its gradient comes last

    def backward_done(p):
        if "bwd" in marks:
            comm.spans.append(("compute", "backward", marks.pop("bwd"), comm.now()))
    last.register_post_accumulate_grad_hook(backward_done)


def run(setup: Setup, strategy: str = "bucketed", measure_step: int | None = None) -> dict:
    """Train `setup.steps` steps with one strategy on this rank: losses, the counts, timeline and memory
    of step `measure_step` (default: the second to last, a step without evaluation), final parameters."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    setup.check(world)
    comm = Comm()
    model = parallelize(build_model(setup), setup.plan(strategy), comm=comm)
    if strategy in ("naive", "bucketed"):
        _instrument(model, comm)
    at = max(0, setup.steps - 2) if measure_step is None else measure_step
    seen = {}

    def hook(event, state):
        if event == "after_step" and state.step == at - 1:
            comm.reset()  # count exactly the measured step
            seen["start"] = comm.now()
        if event == "after_backward" and state.step == at:
            seen["memory"] = {**state_bytes(model, state.optimizer), "grad_norm": None}
        if event == "after_step" and state.step == at:
            seen["memory"]["grad_norm"] = state.grad_norm
            seen["comm"], seen["spans"] = comm.summary(), list(comm.spans)
            seen["step_s"] = comm.now() - seen["start"]
    if at == 0:
        comm.reset()
        seen["start"] = comm.now()
    t = time.perf_counter()
    hist = train(model, batch_fn(setup, rank, world), setup.train_config(), comm=comm, hooks=[hook])
    counted = strategy not in ("ddp", "fsdp2")  # torch's own collectives are not seen by Comm
    psi = getattr(model, "zero_psi", None) or sum(p.numel() for p in full_state(model).values())
    return {"strategy": strategy, "rank": rank, "world": world, "losses": hist.train_loss,
            "grad_norms": hist.grad_norm, "seconds": time.perf_counter() - t,
            "comm": seen["comm"] if counted else None, "spans": seen["spans"], "memory": seen["memory"],
            "step_s": seen["step_s"],
            "psi": psi, "state": full_state(model)}  # the state last: gathering it is not training traffic


def compare(setup: Setup, strategies=STRATEGIES) -> dict:
    """Every strategy vs one-process training: largest parameter difference, losses, counts, memory."""
    ref = reference(setup)
    out = {"reference_losses": ref["losses"], "reference_grad_norms": ref["grad_norms"], "results": {}}
    for name in strategies:
        r = run(setup, name)
        state = r.pop("state")
        if set(state) != set(ref["state"]):
            raise RuntimeError(f"{name}: parameter names differ from the reference: "
                               f"{sorted(set(state) ^ set(ref['state']))}")
        r["max_abs_diff"] = max((state[n] - ref["state"][n]).abs().max().item() for n in ref["state"])
        out["results"][name] = r
    return out


def compare_many(jobs: list[tuple[Setup, tuple[str, ...]]]) -> list[dict]:
    """Several compare() runs in one launch: spawning ranks costs seconds, a tiny step milliseconds."""
    return [compare(setup, strategies) for setup, strategies in jobs]


def run_many(setup: Setup, strategies=STRATEGIES) -> dict:
    """run() for several strategies in one launch, without the parameter copies."""
    out = {}
    for name in strategies:
        r = run(setup, name)
        r.pop("state")
        out[name] = r
    return out


def time_strategies(setup: Setup, strategies=("bucketed", "ddp"), rounds: int = 3) -> dict:
    """Step time of several strategies, in alternating rounds of `setup.steps` steps so they share the
    machine's load; per strategy the minimum step time of this rank (course.measure's statistic)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    setup.check(world)
    models = {n: parallelize(build_model(setup), setup.plan(n), comm=Comm()) for n in strategies}
    fns = {n: batch_fn(setup, rank, world) for n in strategies}
    times = {n: [] for n in strategies}
    cfg = replace(setup.train_config(), eval_interval=10**9)
    for _ in range(rounds):
        for n, model in models.items():
            dist.barrier()  # every rank starts the round together
            hist = train(model, fns[n], cfg, hooks=[lambda e, s: e == "after_step" and dist.barrier()])
            times[n] += [setup.batch_size * setup.block_size / world / tps for tps in hist.tokens_per_s[1:]]
    return {n: {"min_s": min(times[n]), "step_s": times[n],
                "psi": sum(p.numel() for p in full_state(models[n]).values())} for n in strategies}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", default="float64", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    setup = Setup(steps=args.steps, dtype=args.dtype)
    values = launch.main(compare, setup, args.strategies.split(","), nproc=args.nproc)
    first = values[0]  # rank 0's under spawn; this rank's own under torchrun
    if launch.under_torchrun() and int(os.environ["RANK"]) != 0:
        return
    for name, r in first["results"].items():
        print(json.dumps({"strategy": name, "world": r["world"], "max_abs_diff": r["max_abs_diff"],
                          "comm_bytes": r["comm"] and r["comm"]["total_bytes"], "memory": r["memory"],
                          "losses": [round(v, 6) for v in r["losses"]], "setup": asdict(setup)}))


if __name__ == "__main__":
    main()
