"""Lesson 09 (fault tolerance): a run that is killed and resumed, and the figures that compare it.

    spec = Spec()                                         # a small GPT on the offline text, with dropout
    straight = run_straight(spec)                         # in this process, never interrupted
    out = run_with_kills(tmp, spec, ["step@5", "write@12", "rename@16"])   # SIGKILLed three times
    plot_resume(straight, out)                            # the two loss curves, kills marked

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


if __name__ == "__main__":
    worker(sys.argv[1], Spec(**json.loads(sys.argv[2])), json.loads(sys.argv[3]))
