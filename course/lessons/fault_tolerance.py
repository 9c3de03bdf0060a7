"""Lesson 09 (fault tolerance): a run that is killed and resumed, and the figures that compare it.

    spec = Spec()                                         # a small GPT on the offline text, with dropout
    straight = run_straight(spec)                         # in this process, never interrupted
    out = run_with_kills(tmp, spec, ["step@5", "write@12", "rename@16"])   # SIGKILLed three times
    plot_resume(straight, out, kills)                     # the two loss curves, kills marked
    rk = rank_kill(tmp2)                                  # torchrun, one rank SIGKILLed, group restarted
    plot_save_times(save_times(tmp3))                     # blocked time: sync vs async distributed saves

`run_with_kills` starts `python -m course.lessons.fault_tolerance DIR SPEC KILLS` again and again until
it finishes: each attempt resumes from the newest valid checkpoint in DIR and arms the first kill not yet
done (a marker file per kill, so each fires once). Kinds of kill, all SIGKILL (nothing can be cleaned up):
- "step@N": in the middle of step N, after backward and before the update;
- "write@N": halfway through writing the checkpoint of step N (the temporary file holds half its bytes);
- "rename@N": after that file is complete and fsync'ed, before os.replace gives it its final name.
Every attempt runs on one thread: the same float operations in the same order, so a resume that restores
everything reproduces the uninterrupted run bit for bit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import checkpoint as ck
from ..data import load_dataset
from ..model import ModelConfig, Transformer
from ..train import History, TrainConfig, train

KILLS = ("step", "write", "rename")


@dataclass(frozen=True)
class Spec:
    steps: int = 24
    every: int = 4  # a checkpoint every 4 steps
    keep: int = 2
    seed: int = 0
    n_layer: int = 2
    n_embd: int = 32
    block_size: int = 32
    batch_size: int = 8
    dropout: float = 0.1  # so the global torch generator matters too

    def __post_init__(self):
        if self.steps % self.every:
            raise ValueError(f"Spec.steps ({self.steps}) must be a multiple of every ({self.every}): the last step "
                             f"then leaves a checkpoint, which is where the result is read from")


def build(spec: Spec):
    """Model, batch function, the batches' generator and the TrainConfig of a run (deterministic)."""
    data = load_dataset("char")
    torch.manual_seed(spec.seed)
    model = Transformer(ModelConfig(vocab_size=data.tokenizer.vocab_size, block_size=spec.block_size,
                                    n_layer=spec.n_layer, n_head=2, n_embd=spec.n_embd, dropout=spec.dropout))
    gen = torch.Generator().manual_seed(spec.seed + 1)
    batch_fn = lambda split: data.batch(split, spec.batch_size, spec.block_size, generator=gen)  # noqa: E731
    cfg = TrainConfig(max_steps=spec.steps, lr=3e-3, warmup_steps=4, eval_interval=8, eval_iters=2,
                      seed=spec.seed, progress=False)
    return model, batch_fn, gen, cfg


def run_straight(spec: Spec) -> dict:
    """The uninterrupted run, in this process on one thread: {"history", "params"}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, batch_fn, _, cfg = build(spec)
        hist = train(model, batch_fn, cfg, label="uninterrupted")
    finally:
        torch.set_num_threads(threads)
    return {"history": hist, "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def parse_kill(kill: str) -> tuple[str, int]:
    kind, _, step = kill.partition("@")
    if kind not in KILLS or not step.isdigit():
        raise ValueError(f"a kill is '<kind>@<step>' with kind in {KILLS}, got {kill!r}")
    return kind, int(step)


def _die(marker: Path):
    marker.touch()  # in the kernel's page cache at once: it outlives this process
    os.kill(os.getpid(), signal.SIGKILL)


def worker(directory: str, spec: Spec, kills: list[str]) -> None:
    """One attempt: resume if there is anything to resume, arm the first kill not yet done, train."""
    torch.set_num_threads(1)
    directory = Path(directory)
    armed = next(((i, *parse_kill(k)) for i, k in enumerate(kills) if not (directory / f"killed-{i}").exists()), None)
    model, batch_fn, gen, cfg = build(spec)
    ckpt = ck.Checkpointer(directory, every=spec.every, keep=spec.keep, data=gen)
    hooks = [ckpt]
    if armed is not None:
        i, kind, at = armed
        marker = directory / f"killed-{i}"
        if kind == "step":
            hooks.insert(0, lambda event, s: _die(marker) if event == "after_backward" and s.step == at else None)
        else:
            plain = ck._write

            def write(f, blob):  # the checkpoint of step `at` is the one written after step at - 1
                if ckpt.saving_step != at:
                    return plain(f, blob)
                f.write(blob[:len(blob) // 2] if kind == "write" else blob)
                f.flush()
                os.fsync(f.fileno())
                _die(marker)
            ck._write = write

    def resume(model, optimizer):  # report where this attempt starts before anything can kill it
        found = ckpt.resume(model, optimizer)
        print(json.dumps({"resumed_from": found and found[0]}), flush=True)
        return found
    train(model, batch_fn, cfg, hooks=hooks, resume=resume)


def run_with_kills(directory, spec: Spec, kills: list[str], timeout: float = 120.0) -> dict:
    """Start attempts until one finishes. Returns {"attempts": [{"returncode", "signal", "resumed_from": the
    step it resumed at or None, "files": the directory after it}], "history",
    "params"} read from the last checkpoint (the one of the final step)."""
    for k in kills:
        parse_kill(k)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    attempts = []
    for _ in range(len(kills) + 1):
        proc = subprocess.run([sys.executable, "-m", __name__, str(directory), json.dumps(asdict(spec)),
                               json.dumps(kills)], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        first = proc.stdout.strip().splitlines()[:1]
        attempts.append({"returncode": proc.returncode, "signal": -proc.returncode if proc.returncode < 0 else None,
                         "resumed_from": json.loads(first[0])["resumed_from"] if first else None,
                         "files": sorted(p.name for p in directory.iterdir())})
        if proc.returncode == 0:
            break
        if proc.returncode != -signal.SIGKILL:
            raise RuntimeError(f"an attempt failed with exit code {proc.returncode}:\n{proc.stderr[-3000:]}")
    else:
        raise RuntimeError(f"the run did not finish after {len(attempts)} attempts")
    final = ck.read(directory / ck.checkpoint_name(spec.steps))
    return {"attempts": attempts, "history": History(**final["history"]), "params": final["model"]}


def same_run(a: dict, b: dict) -> bool:
    """Bit for bit: the same losses (train and validation) and torch.equal final parameters."""
    ha, hb = a["history"], b["history"]
    return (ha.steps == hb.steps and ha.train_loss == hb.train_loss and ha.val_loss == hb.val_loss
            and a["params"].keys() == b["params"].keys()
            and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"]))


def plot_resume(straight: dict, resumed: dict, kills: list[str], ax=None):
    """Training loss of the uninterrupted run (line) and of the killed-and-resumed one (dots); a dashed
    line at each kill, labelled with its kind."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    a, b = straight["history"], resumed["history"]
    ax.plot(a.steps, a.train_loss, lw=2, color="tab:blue", label="uninterrupted")
    ax.plot(b.steps, b.train_loss, "o", ms=4, color="tab:orange", label="killed 3 times, resumed")
    for i, k in enumerate(kills):
        kind, step = parse_kill(k)
        at = step if kind == "step" else step - 0.5  # a checkpoint of step N is written after step N - 1
        ax.axvline(at, ls="--", color="gray", lw=1)
        ax.text(at, max(a.train_loss), f" SIGKILL\n {k}", fontsize=7, va="top", color="dimgray")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    return ax


def rank_kill(directory, job=None, timeout: float = 400.0) -> dict:
    """torchrun --max-restarts=1 with one rank SIGKILLed mid-step (course.parallel.fault_experiments), and
    the same job nobody kills (launch.run): {"killed", "straight", "equal", "seconds"}."""
    import time
    from dataclasses import replace
    from ..parallel import fault_experiments as fe, launch
    job = job or fe.Job()
    directory = Path(directory)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "course.parallel.fault_experiments", str(directory / "killed"), "--job", json.dumps(asdict(job))]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    seconds = time.perf_counter() - t0
    killed = torch.load(directory / "killed" / "result.pt", weights_only=True)
    straight = launch.run(fe.elastic_train, 2, str(directory / "straight"), replace(job, kill_step=-1),
                          timeout=timeout, threads=1).values[0]
    equal = (killed["train_loss"] == straight["train_loss"]
             and all(torch.equal(killed["params"][k], straight["params"][k]) for k in straight["params"]))
    return {"killed": killed, "straight": straight, "equal": equal, "seconds": seconds, "job": job}


def save_times(directory, n_embd: int = 128, repeats: int = 3) -> dict:
    """Seconds a save blocks training on 2 ranks: synchronous DCP, AsyncSaver, dcp.async_save (rank 0)."""
    from ..parallel import fault_experiments as fe, launch
    job = fe.Job(n_embd=n_embd, n_layer=2, vocab_size=256, block_size=64)
    return launch.run(fe.save_timing, 2, str(directory), job, repeats, timeout=400, threads=1).values[0]


def plot_save_times(t: dict, ax=None):
    """Bars: how long the training loop waits per save, beside one training step."""
    import matplotlib.pyplot as plt
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    names = ["synchronous\ndcp.save", "AsyncSaver\n(stage + thread)", "dcp.async_save", "one step, while\nAsyncSaver writes"]
    values = [1e3 * t[k] for k in ("sync_blocked_s", "ours_blocked_s", "torch_blocked_s", "step_s")]
    ax.bar(names, values, color=["tab:red", "tab:green", "tab:olive", "tab:gray"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("training blocked per save (ms)")
    ax.set_title(f"{t['params']:,} parameters + AdamW state, 2 gloo ranks", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return ax


if __name__ == "__main__":
    worker(sys.argv[1], Spec(**json.loads(sys.argv[2])), json.loads(sys.argv[3]))
