"""Lesson 09 (fault tolerance): save a training checkpoint and resume from it, exactly.

A resumed run must continue as if it had never stopped: same weights, same optimizer state (AdamW's
step count and both moments), same position in the data stream (the generator's state), same step.
The check trains a small float64 model 6 steps straight, and again for 3 steps, saves, restores into
FRESH objects (other initial weights, another generator seed) and trains 3 more: the final weights
must be bit-identical, because the same float64 operations then run in the same order.

The reference is the library's: `course.checkpoint.save` / `load` (whole state, written atomically with
a SHA-256 checksum); the data generator goes in as its `data` position.
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from .core import Hint, call, exercise


def _save_checkpoint(path, model, optimizer, step, generator):
    """Reference solution: course.checkpoint.save with the generator as the data position."""
    from course import checkpoint
    checkpoint.save(path, model, optimizer, step=step, data=generator)


def _load_checkpoint(path, model, optimizer, generator):
    """Reference solution: restore in place (and every global generator), return the step to continue from."""
    from course import checkpoint
    return checkpoint.load(path, model, optimizer, data=generator)["step"]


def _setup(seed_model, seed_data):
    torch.manual_seed(seed_model)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt, torch.Generator().manual_seed(seed_data)


def _train(model, opt, gen, steps):
    for _ in range(steps):
        x = torch.randn(16, 4, generator=gen, dtype=torch.float64)  # the data stream: drawn from gen
        loss = (model(x).squeeze(-1) - x.sum(-1).sin()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@exercise("09", "resume", solution=(_save_checkpoint, _load_checkpoint))
def check_resume(fns, rng, gen):
    """check_resume((save_checkpoint, load_checkpoint)): save_checkpoint(path, model, optimizer, step,
    generator) writes everything a run needs; load_checkpoint(path, model, optimizer, generator)
    restores it in place and returns the step to continue from."""
    if not (isinstance(fns, tuple) and len(fns) == 2 and all(callable(f) for f in fns)):
        raise Hint("pass the pair of functions: check_resume((save_checkpoint, load_checkpoint))")
    save, load = fns
    total, stop = 6, 3
    straight = _setup(0, 1)
    _train(*straight, total)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        model, opt, data = _setup(0, 1)
        _train(model, opt, data, stop)
        call(save, path, model, opt, stop, data, describe="save_checkpoint(path, model, optimizer, 3, generator)")
        model2, opt2, data2 = _setup(7, 8)  # a fresh process: other weights, other data seed, no optimizer state
        step = call(load, path, model2, opt2, data2, describe="load_checkpoint(path, model, optimizer, generator)")
    if not _same(model2.state_dict(), model.state_dict()):
        raise Hint("after load_checkpoint the model's weights differ from the saved ones: save model.state_dict() "
                   "and load it with model.load_state_dict(...)")
    saved, loaded = opt.state_dict()["state"], opt2.state_dict()["state"]
    if len(loaded) != len(saved) or not all(_same(saved[k], loaded[k]) for k in saved):
        raise Hint("AdamW's state was not restored (its step count and the moments exp_avg, exp_avg_sq): without "
                   "it the resumed run restarts the moving averages. Save optimizer.state_dict() too")
    if not torch.equal(data2.get_state(), data.get_state()):
        raise Hint("the data generator's state was not restored: the resumed run would draw different batches "
                   "than the run that never stopped. Save generator.get_state(), restore with set_state()")
    if step != stop:
        raise Hint(f"load_checkpoint returned {step!r}; it should return the saved step ({stop}) so training "
                   f"continues from there")
    _train(model2, opt2, data2, total - stop)
    if not _same(model2.state_dict(), straight[0].state_dict()):
        raise Hint("the resumed run ends with different weights than the run that never stopped")
    return "6 steps straight vs 3 + save + restore into fresh objects + 3: bit-identical weights"



def _clip_by_global_norm(grads, max_norm):
    """Reference: torch.nn.utils.clip_grad_norm_ (what course.train.clip_grad_norm_ calls), on copies."""
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, max_norm)
    return [p.grad for p in params]


@exercise("09", "clip_by_global_norm", solution=_clip_by_global_norm)
def check_clip_by_global_norm(fn, rng, gen):
    """clip_by_global_norm(grads, max_norm) -> new list of gradients: if the global norm
    sqrt(sum of every element squared, over all tensors) exceeds max_norm, scale EVERY tensor by
    max_norm / norm; otherwise return them unchanged (GPT-3 clips at 1.0, Brown et al. 2020, appendix B)."""
    # torch divides by (norm + 1e-6); the norms here are >= 0.1, so either convention agrees to 1e-5 relative
    rtol = 1e-5
    cases = [(4, 0.5), (3, 1e3), (5, 1.0), (1, 0.1), (6, 2.0)]
    for n, max_norm in cases:
        grads = [torch.randn(rng.randint(1, 5), rng.randint(1, 5), generator=gen, dtype=torch.float64) * rng.choice(
            [0.1, 1, 10]) for _ in range(n)]
        got = call(fn, [g.clone() for g in grads], max_norm, describe=f"clip_by_global_norm({n} tensors, {max_norm})")
        if not isinstance(got, (list, tuple)) or len(got) != n or not all(isinstance(g, torch.Tensor) for g in got):
            raise Hint(f"clip_by_global_norm should return a list of {n} tensors, one per gradient")
        want = _clip_by_global_norm(grads, max_norm)
        if all(g.shape == w.shape and torch.allclose(g, w, rtol=rtol, atol=0) for g, w in zip(got, want)):
            continue
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
        if norm <= max_norm:
            raise Hint(f"the global norm is {norm:.3f} <= max_norm = {max_norm}: the gradients must stay unchanged")
        per_tensor = [g * min(1.0, max_norm / g.norm().item()) for g in grads]
        if all(torch.allclose(g, w, rtol=rtol) for g, w in zip(got, per_tensor)):
            raise Hint("you clipped each tensor by its own norm; clip by the GLOBAL norm over all tensors, with one "
                       "common scale, so the update keeps its direction")
        summed = sum(g.norm().item() for g in grads)
        if all(torch.allclose(g, w * max_norm / summed, rtol=rtol) for g, w in zip(got, grads)):
            raise Hint("the global norm is sqrt(sum of every squared element), not the sum of the tensors' norms")
        raise Hint(f"with global norm {norm:.3f} and max_norm {max_norm}, every gradient should be scaled by "
                   f"{max_norm / norm:.4f}")
    return f"{len(cases)} gradient sets, clipped and not"


def _lr_at(step, lr, min_lr, warmup_steps, max_steps):
    from course.train import TrainConfig, lr_at
    return lr_at(step, TrainConfig(max_steps=max_steps, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps))


@exercise("09", "lr_at", solution=_lr_at)
def check_lr_at(fn, rng, gen):
    """lr_at(step, lr, min_lr, warmup_steps, max_steps) -> the learning rate of `step` (0-based): linear
    warmup lr·(step + 1)/warmup_steps for step < warmup_steps, then cosine decay from lr to min_lr at
    max_steps, and min_lr after that (course.train.lr_at, GPT-3's recipe, Brown et al. 2020, appendix B)."""
    cases = [(3e-3, 3e-4, 10, 100), (1.0, 0.0, 4, 20), (6e-4, 6e-5, 1, 50)]
    checked = 0
    for lr, min_lr, warm, total in cases:
        for step in sorted({0, warm - 1, warm, (warm + total) // 2, total - 1, total, total + 10,
                            rng.randrange(total)}):
            got = call(fn, step, lr, min_lr, warm, total)
            want = _lr_at(step, lr, min_lr, warm, total)
            if isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - want) <= 1e-12 * lr:
                checked += 1
                continue
            what = f"lr_at({step}, lr={lr}, min_lr={min_lr}, warmup_steps={warm}, max_steps={total}) = {got!r}"
            if step < warm:
                raise Hint(f"{what}: during warmup the rate rises linearly, lr·(step + 1)/warmup_steps = {want:.6g} "
                           f"(step 0 already learns)")
            if step >= total:
                raise Hint(f"{what}: after max_steps the rate stays at min_lr = {min_lr}")
            raise Hint(f"{what}, expected {want:.6g}: half a cosine from lr down to min_lr between the end of warmup "
                       f"and max_steps, min_lr + (lr - min_lr)·(1 + cos(pi·progress))/2")
    return f"{checked} steps of {len(cases)} schedules"
