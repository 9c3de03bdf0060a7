"""Worker functions the lesson, the tests and the benchmark run on N ranks (importable, so spawnable).

Every experiment uses the shared course.model.Transformer, fp32, the same seed on every rank, and
the same global batch each step (rank r trains on rows r*B/N..(r+1)*B/N), so its result can be
compared with one process training on the full batch.

    python -m course.parallel.experiments --nproc 2             # all strategies vs one process
    torchrun --standalone --nproc-per-node=2 -m course.parallel.experiments   # the same, by torchrun
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..model import ModelConfig, Transformer
from . import launch
from .comm import Comm
from .data_parallel import BucketedDP, NaiveDP, TorchDDP, TorchFSDP2, shard_batch, train_step
from .zero import ZeRO

STRATEGIES = ("naive", "bucketed", "zero1", "zero2", "zero3", "ddp", "fsdp2")


@dataclass
class Setup:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    vocab_size: int = 64
    block_size: int = 16
    batch_size: int = 8  # global batch (sequences per optimizer step, all ranks together)
    micro_batches: int = 1  # gradient accumulation: micro-batches per rank per step
    sync_every_micro_batch: bool = False  # True: all-reduce after every micro-batch (no no_sync)
    steps: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.1
    bucket_mb: float = 0.02
    seed: int = 0
    data: str = "random"  # "random" tokens or "text" (course.data, char tokenizer)
    adamw: dict = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        return ModelConfig.gpt(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                               vocab_size=self.vocab_size, block_size=self.block_size)

    def optimizer_kwargs(self) -> dict:
        return dict(lr=self.lr, weight_decay=self.weight_decay, betas=(0.9, 0.95), **self.adamw)

    def check(self, world: int) -> None:
        if self.batch_size % self.micro_batches:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by micro_batches "
                             f"({self.micro_batches})")
        shard_batch(torch.empty(self.batch_size), 0, world)  # raises on world > batch or indivisible
        if (self.batch_size // world) % self.micro_batches:
            raise ValueError(f"per-rank batch ({self.batch_size // world}) must be divisible by "
                             f"micro_batches ({self.micro_batches})")


def global_batch(setup: Setup, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (B, T) batch on every rank for a given step."""
    g = torch.Generator().manual_seed(setup.seed * 100_003 + step)
    if setup.data == "text":
        from ..data import load_dataset
        return load_dataset("char").batch("train", setup.batch_size, setup.block_size, generator=g)
    tokens = torch.randint(setup.vocab_size, (setup.batch_size, setup.block_size + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def local_micro_batches(setup: Setup, step: int, rank: int, world: int):
    x, y = global_batch(setup, step)
    x, y = shard_batch(x, rank, world), shard_batch(y, rank, world)  # (B/N, T)
    x, y = x.to(launch.rank_device()), y.to(launch.rank_device())
    return list(zip(x.chunk(setup.micro_batches), y.chunk(setup.micro_batches)))


def build_model(setup: Setup) -> Transformer:
    if setup.data == "text":
        from ..data import load_dataset
        setup.vocab_size = load_dataset("char").tokenizer.vocab_size
    torch.manual_seed(setup.seed)
    return Transformer(setup.model_config()).to(launch.rank_device())


def make_strategy(name: str, model, comm: Comm, setup: Setup):
    kw = setup.optimizer_kwargs()
    if name == "naive":
        return NaiveDP(model, comm, **kw)
    if name == "bucketed":
        return BucketedDP(model, comm, bucket_mb=setup.bucket_mb, **kw)
    if name.startswith("zero") and name[4:].isdigit():
        return ZeRO(model, comm, stage=int(name[4:]), **kw)
    if name == "ddp":
        return TorchDDP(model, comm, bucket_mb=setup.bucket_mb, **kw)
    if name == "fsdp2":
        return TorchFSDP2(model, comm, **kw)
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")


def reference(setup: Setup) -> tuple[dict, list[float], list[float]]:
    """One process, full batch, plain AdamW: parameters, losses and gradient norms to match.

    Adam is nearly blind to the gradient's scale, so a summed instead of averaged gradient would
    barely move the parameters: the gradient norm is compared too."""
    model = build_model(setup)
    opt = torch.optim.AdamW(model.parameters(), **setup.optimizer_kwargs())
    losses, norms = [], []
    for step in range(setup.steps):
        x, y = global_batch(setup, step)
        _, loss = model(x.to(launch.rank_device()), y.to(launch.rank_device()))
        loss.backward()
        norms.append(sum(p.grad.double().pow(2).sum() for p in model.parameters()).item() ** 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, norms


def train(setup: Setup, strategy: str = "bucketed", measure_memory: bool = False) -> dict:
    """Train `setup.steps` steps with one strategy on this rank. Per-step losses, comm, timeline, memory."""
    rank, world = dist.get_rank(), dist.get_world_size()
    setup.check(world)
    comm = Comm()
    strat = make_strategy(strategy, build_model(setup), comm, setup)
    losses, step_s, memory = [], [], None
    for step in range(setup.steps):
        comm.reset()  # keep the last step's counts and timeline
        t = time.perf_counter()
        loss, mem = train_step(strat, local_micro_batches(setup, step, rank, world),
                               measure_memory=measure_memory and step == setup.steps - 1,
                               sync_every_micro_batch=setup.sync_every_micro_batch)
        step_s.append(time.perf_counter() - t)
        losses.append(_global_mean(loss, world))
        memory = mem or memory
    counted = strategy not in ("ddp", "fsdp2")  # torch's own collectives are not seen by Comm
    out = {"strategy": strategy, "rank": rank, "world": world, "losses": losses, "step_s": step_s,
           "comm": comm.summary() if counted else None, "spans": list(comm.spans), "memory": memory}
    state = strat.full_state_dict()  # after the counts: gathering it (ZeRO-3) is not training traffic
    out["psi"] = getattr(strat, "psi", sum(t.numel() for t in state.values()))  # ZeRO: with padding
    out["state"] = state
    return out


def _global_mean(x: float, world: int) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=launch.rank_device())
    if world > 1:
        dist.all_reduce(t)
    return t.item() / world


def compare(setup: Setup, strategies=STRATEGIES, measure_memory: bool = True) -> dict:
    """Every strategy vs one-process full-batch training: max |Δparam|, loss, last-step comm and memory."""
    ref_state, ref_losses, ref_norms = reference(setup)
    out = {"reference_losses": ref_losses, "reference_grad_norm": ref_norms[-1], "results": {}}
    for name in strategies:
        r = train(setup, name, measure_memory=measure_memory)
        state = r.pop("state")
        if set(state) != set(ref_state):
            raise RuntimeError(f"{name}: parameter names differ from the reference: "
                               f"{sorted(set(state) ^ set(ref_state))}")
        r["max_abs_diff"] = max((state[n] - ref_state[n]).abs().max().item() for n in ref_state)
        out["results"][name] = r
    return out


def time_strategies(setup: Setup, strategies=("bucketed", "ddp"), warmup: int = 3) -> dict:
    """Step time of several strategies, interleaved step by step so they share the machine's load.

    Returns, per strategy, the median step time of this rank, every step time, and the last step's
    counted communication."""
    import statistics
    rank, world = dist.get_rank(), dist.get_world_size()
    setup.check(world)
    strats = {name: make_strategy(name, build_model(setup), Comm(), setup) for name in strategies}
    times = {name: [] for name in strategies}
    for step in range(warmup + setup.steps):
        for name, strat in strats.items():
            batches = local_micro_batches(setup, step, rank, world)
            dist.barrier()  # every rank starts the step together
            strat.comm.reset()
            t = time.perf_counter()
            train_step(strat, batches)  # loss.item() inside waits for the device
            if step >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: {"median_s": statistics.median(times[name]), "step_s": times[name],
                   "comm": strats[name].comm.summary() if name not in ("ddp", "fsdp2") else None,
                   "psi": getattr(strats[name], "psi", None) or sum(p.numel() for p in strats[name].full_state_dict().values())}
            for name in strategies}


def train_many(setup: Setup, strategies=STRATEGIES, measure_memory: bool = True) -> dict:
    """train() for several strategies in one launch, without the parameter copies."""
    out = {}
    for name in strategies:
        r = train(setup, name, measure_memory=measure_memory)
        r.pop("state")
        out[name] = r
    return out


def compare_many(jobs: list[tuple[Setup, tuple[str, ...]]]) -> list[dict]:
    """Several compare() runs in one launch: spawning ranks costs seconds, a tiny step milliseconds."""
    return [compare(setup, strategies) for setup, strategies in jobs]


def fail_on(rank_to_fail: int, message: str = "boom") -> None:
    """For tests: one rank raises while the others wait in a collective that will never complete."""
    if dist.get_rank() == rank_to_fail:
        raise RuntimeError(f"{message} on rank {rank_to_fail}")
    dist.barrier()
    dist.all_reduce(torch.ones(1))


def sleep_forever() -> None:
    """For tests: a run that never ends on its own (the launcher's timeout must stop it)."""
    while True:
        time.sleep(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn (ignored under torchrun)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    setup = Setup(steps=args.steps)
    values = launch.main(compare, setup, args.strategies.split(","), nproc=args.nproc)
    first = values[0]  # rank 0's under spawn; this rank's own under torchrun
    if launch.under_torchrun() and int(os.environ["RANK"]) != 0:
        return
    for name, r in first["results"].items():
        print(json.dumps({"strategy": name, "world": r["world"], "max_abs_diff": r["max_abs_diff"],
                          "comm_bytes": r["comm"] and r["comm"]["total_bytes"], "memory": r["memory"],
                          "losses": [round(l, 5) for l in r["losses"]]}))

if __name__ == "__main__":
    main()
