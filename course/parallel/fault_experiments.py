"""Fault-tolerance experiments on N ranks (importable, so spawnable): resharded resume, async save, a rank dies.

    launch.run(reshard_save, 4, path, Job())     # FSDP2 on 4 ranks: train, save a distributed checkpoint
    launch.run(reshard_load, 2, path, Job())     # FSDP2 on 2 ranks: load it (resharded), gather, compare
    launch.run(save_timing, 2, path, Job(n_embd=128))   # blocked time: sync save vs async (ours, PyTorch's)

    # a data-parallel run in which rank 1 SIGKILLs itself in the middle of step 7, once (a marker file);
    # torchrun restarts both ranks, they resume from their last checkpoint and finish:
    torchrun --standalone --nproc-per-node=2 --max-restarts=1 -m course.parallel.fault_experiments DIR

Every rank trains the shared Transformer with the one loop (course.train.train) on its own batches (its
own generator, seeded by rank), on one thread, so two runs of the same job do the same float operations
in the same order: the rank-kill run's final parameters equal the uninterrupted run's bit for bit.
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .. import checkpoint as ck
from ..model import ModelConfig, Transformer
from ..parallelize import Plan, parallelize
from ..train import TrainConfig, make_optimizer, train, unwrap
from . import dcp, launch
from .comm import Comm


@dataclass(frozen=True)
class Job:
    n_layer: int = 2
    n_embd: int = 32
    vocab_size: int = 64
    block_size: int = 16
    batch_size: int = 4  # per rank
    steps: int = 12
    every: int = 3  # checkpoint interval (steps)
    seed: int = 0
    kill_rank: int = 1
    kill_step: int = 7  # -1: nobody dies


def _model(job: Job, plan: Plan, seed=None):
    torch.manual_seed(job.seed if seed is None else seed)
    model = Transformer(ModelConfig(vocab_size=job.vocab_size, block_size=job.block_size, n_layer=job.n_layer,
                                    n_head=2, n_embd=job.n_embd))
    return parallelize(model, plan)


def _data(job: Job, rank: int):
    gen = torch.Generator().manual_seed(1000 * job.seed + rank)

    def batch(split):  # (B, T) random tokens and their shift
        x = torch.randint(0, job.vocab_size, (job.batch_size, job.block_size + 1), generator=gen)
        return x[:, :-1], x[:, 1:]
    return batch, gen


def _cfg(job: Job, steps=None):
    steps = steps or job.steps
    return TrainConfig(max_steps=steps, lr=3e-3, warmup_steps=min(2, steps), eval_interval=1000, eval_iters=1,
                       seed=job.seed, progress=False)


def full(state):
    """The same nested state with every DTensor gathered whole (a collective: call on every rank)."""
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, list):
        return [full(v) for v in state]
    if isinstance(state, DTensor):
        return state.full_tensor().detach().clone()
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


def reshard_save(path: str, job: Job) -> dict:
    """Train job.every steps under FSDP2 on this world and save the same state three ways into
    path/{sync,ours,torch}: dcp.save, AsyncSaver, dcp.async_save. Returns the whole state (gathered)."""
    model = _model(job, Plan(shard="fsdp2"))
    opt = make_optimizer(model, _cfg(job))
    batch, _ = _data(job, dist.get_rank())
    train(model, batch, _cfg(job, job.every), optimizer=opt)
    root = Path(path)
    dcp.save(root / "sync", model, opt, job.every)
    saver = dcp.AsyncSaver()
    saver.save(root / "ours", model, opt, job.every)
    saver.wait()
    group = dist.new_group(backend="gloo")
    dcp.torch_async_save(root / "torch", model, opt, job.every, group).result()
    dcp.publish(root / "torch", group)
    local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    return {"state": full(dcp.training_state(model, opt, job.every)), "local_shapes": local}


def reshard_load(path: str, job: Job, names=("sync", "ours", "torch")) -> dict:
    """For each saved copy: a fresh FSDP2 model (other initial weights) on this world, filled from it;
    {name: whole state}, and this rank's parameter shard shapes."""
    out = {}
    for name in names:
        model = _model(job, Plan(shard="fsdp2"), seed=job.seed + 7)
        opt = make_optimizer(model, _cfg(job))
        step = dcp.load(Path(path) / name, model, opt)
        out[name] = full(dcp.training_state(model, opt, step))
    local = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
    return {"states": out, "local_shapes": local}


def save_timing(path: str, job: Job, repeats: int = 3) -> dict:
    """Seconds the training loop is blocked per save: synchronous dcp.save, AsyncSaver (stage + thread),
    dcp.async_save; also one training step's time. Medians over `repeats`, on this rank."""
    model = _model(job, Plan(shard="fsdp2"))
    opt = make_optimizer(model, _cfg(job))
    batch, _ = _data(job, dist.get_rank())
    train(model, batch, _cfg(job, 2), optimizer=opt)  # optimizer state exists: a realistic checkpoint
    saver, group, out = dcp.AsyncSaver(), dist.new_group(backend="gloo"), {"sync": [], "ours": [], "torch": []}
    step_s = []
    for i in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dcp.save(Path(path) / f"sync-{i}", model, opt, i)
        out["sync"].append(time.perf_counter() - t0)
        dist.barrier()
        saver.save(Path(path) / f"ours-{i}", model, opt, i)
        out["ours"].append(saver.blocked_s[-1])
        t0 = time.perf_counter()
        train(model, batch, _cfg(job, 1), optimizer=opt)  # a step while the write runs
        step_s.append(time.perf_counter() - t0)
        saver.wait()
        dist.barrier()
        t0 = time.perf_counter()
        future = dcp.torch_async_save(Path(path) / f"torch-{i}", model, opt, i, group)
        out["torch"].append(time.perf_counter() - t0)
        future.result()
        dcp.publish(Path(path) / f"torch-{i}", group)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    params = sum(p.numel() for p in unwrap(model).parameters())
    return {"params": params, "step_s": med(step_s), **{f"{k}_blocked_s": med(v) for k, v in out.items()}}


def elastic_train(directory: str, job: Job) -> dict:
    """Data parallel (torch DDP) with per-rank checkpoints every job.every steps; rank job.kill_rank kills
    itself in the middle of step job.kill_step the first time (marker file). Returns rank 0's result."""
    torch.set_num_threads(1)
    rank, directory = dist.get_rank(), Path(directory)
    comm = Comm()
    model = _model(job, Plan(data_parallel="ddp"))
    batch, gen = _data(job, rank)
    ckpt = ck.Checkpointer(directory, every=job.every, keep=2, data=gen, comm=comm)
    marker = directory / "killed"

    def die(event, state):
        if event == "after_backward" and rank == job.kill_rank and state.step == job.kill_step and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
    hist = train(model, batch, _cfg(job), hooks=[die, ckpt], resume=ckpt.resume, comm=comm)
    resumed = None if ckpt.resumed_from is None else int(ck.NAME.fullmatch(ckpt.resumed_from.name).group(1))
    result = {"params": {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()},
              "train_loss": hist.train_loss, "resumed_at": resumed,
              "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))}
    if rank == 0:
        torch.save(result, directory / "result.pt")
    return result


def init_attempt(timeout: float = 120.0) -> None:
    """Join torchrun's process group with keys of THIS attempt. torch 2.13's torchrun shares its
    rendezvous TCPStore with the workers (TORCHELASTIC_USE_AGENT_STORE) and keeps it across restarts, so a
    restarted group's gloo ranks read the dead attempt's addresses and fail to connect ("Connection
    refused" to the killed rank's old port); a prefix per restart (TORCHELASTIC_RESTART_COUNT) avoids it."""
    if dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        launch.init(timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    attempt = dist.PrefixStore(f"course-attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(launch.backend(), store=attempt, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(seconds=timeout))


def main(argv=None):
    parser = argparse.ArgumentParser(description="data-parallel training in which one rank dies once")
    parser.add_argument("directory")
    parser.add_argument("--job", default="{}", help="JSON of Job fields")
    args = parser.parse_args(argv)
    job = Job(**json.loads(args.job))
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints where a rank waits
    if launch.under_torchrun():
        init_attempt()
    launch.main(elastic_train, args.directory, job, nproc=2, timeout=120)


if __name__ == "__main__":
    main()
