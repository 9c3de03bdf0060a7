"""Anomalies in a training run: detect them, act on them, and inject them on purpose to test both.

    guard = AnomalyGuard(model, policy="rollback")            # or "skip", "lower_lr"
    faults = FaultInjector(model, {30: "nan", 60: "lr_spike"})
    train(model, faults.wrap(batch_fn), cfg, hooks=[faults, guard])
    guard.events                                              # [(step, reason, action), ...]

Detection (`SpikeDetector`), checked before each update (the loop's "before_update" hook event):
- a non-finite loss or gradient norm (an overflow, a NaN in an activation, a corrupted weight);
- a loss spike: z = (loss - mean) / std against the last `window` accepted losses, flagged when
  z > `z_max`. Why 6: if the per-batch losses were Gaussian around a flat trend, z·sqrt(n/(n+1)) of a
  fresh loss against n = 20 earlier ones would follow Student's t with 19 degrees of freedom, and
  P(t19 > 5.85) is about 6e-6 per step (fewer than one false alarm in 100,000 steps). Real losses
  fall and have heavier tails; the tests check that clean runs stay silent. Only upward jumps count,
  and the detector waits for `min_history` losses before judging spikes. While the loss still falls
  steeply (the first tens of steps) the window's std is large and a spike must be larger to count.

Policies (`POLICIES`), each skipping the offending update (state.skip: no optimizer step, so the
weights and AdamW's moments and step count are untouched):
- "skip": only that. Enough for a bad batch; useless once the weights themselves are bad.
- "lower_lr": also multiply the learning rate by `lr_factor` for the rest of the run.
- "rollback": also restore the model, the optimizer and the detector to the last good in-memory
  snapshot (taken every `snapshot_every` steps, before the update of a step whose loss passed the
  check, so its weights are known good), and so skip every batch since. PaLM (Chowdhery et al. 2022,
  §5.1) handled its ~20 loss spikes this way at scale: "re-started training from a checkpoint roughly
  100 steps before the spike started, and skipped roughly 200-500 data batches". On disk this is
  `course.checkpoint`; here the snapshot lives in memory.

Faults (`FAULTS`) injected at a chosen step: "corrupt_batch" (the step's batch replaced by uniformly
random tokens, as a mis-tokenized or binary file would give), "nan" (a NaN written into the first
block's output during that step's forward), "lr_spike" (that step's learning rate multiplied by
`lr_factor`, a mis-set schedule), "bit_flip" (one bit of one weight flipped before the step's
forward, as a memory error would: bit 30 is the top exponent bit of a float32, turning 0.02 into ~7e36).
"""
from __future__ import annotations

import copy
import math
import statistics
from collections import deque

import torch

POLICIES = ("skip", "lower_lr", "rollback")
FAULTS = ("corrupt_batch", "nan", "lr_spike", "bit_flip")


class SpikeDetector:
    """check(loss, grad_norm) -> None or the reason; accept(loss) adds a good loss to the window."""

    def __init__(self, window: int = 20, z_max: float = 6.0, min_history: int = 10):
        for name, v, low in (("window", window, 2), ("min_history", min_history, 2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if min_history > window:
            raise ValueError(f"min_history ({min_history}) must be <= window ({window})")
        if not (isinstance(z_max, (int, float)) and math.isfinite(z_max) and z_max > 0):
            raise ValueError(f"z_max must be a finite number > 0, got {z_max!r}")
        self.window, self.z_max, self.min_history = window, float(z_max), min_history
        self.losses: deque[float] = deque(maxlen=window)
        self.z: list[float] = []  # the z-score of every checked loss (nan before min_history)

    def zscore(self, loss: float) -> float:
        if len(self.losses) < self.min_history:
            return math.nan
        mean, std = statistics.fmean(self.losses), statistics.stdev(self.losses)
        if std == 0:
            return math.inf if loss > mean else 0.0
        return (loss - mean) / std

    def check(self, loss: float, grad_norm: float | None = None) -> str | None:
        if not math.isfinite(loss):
            self.z.append(math.nan)
            return f"non-finite loss ({loss})"
        if grad_norm is not None and not math.isfinite(grad_norm):
            self.z.append(math.nan)
            return f"non-finite gradient norm ({grad_norm})"
        z = self.zscore(loss)
        self.z.append(z)
        if z > self.z_max:
            return f"loss spike (z = {z:.1f} > {self.z_max:g})"
        return None

    def accept(self, loss: float):
        self.losses.append(float(loss))

    def state(self):
        return list(self.losses)

    def restore(self, state):
        self.losses = deque(state, maxlen=self.window)


class AnomalyGuard:
    """A hook for course.train.train: detects before each update and applies `policy`."""

    def __init__(self, model: torch.nn.Module, policy: str = "skip", detector: SpikeDetector | None = None,
                 lr_factor: float = 0.5, snapshot_every: int = 10, monitor=None):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not (isinstance(lr_factor, (int, float)) and math.isfinite(lr_factor) and 0 < lr_factor < 1):
            raise ValueError(f"lr_factor must be a number in (0, 1) (it lowers the learning rate), got {lr_factor!r}")
        if not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 1:
            raise ValueError(f"snapshot_every must be an integer >= 1, got {snapshot_every!r}")
        self.model, self.policy, self.lr_factor, self.snapshot_every = model, policy, float(lr_factor), snapshot_every
        self.detector = detector or SpikeDetector()
        self.monitor = monitor
        self.lr_scale = 1.0
        self.snapshot = None  # (step, model state, optimizer state, detector state)
        self.events: list[tuple[int, str, str]] = []

    def take_snapshot(self, step: int, optimizer):
        self.snapshot = (step, {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                         copy.deepcopy(optimizer.state_dict()), self.detector.state())

    def restore(self, optimizer) -> int:
        step, model_state, opt_state, det_state = self.snapshot
        self.model.load_state_dict(model_state)
        optimizer.load_state_dict(copy.deepcopy(opt_state))
        self.detector.restore(det_state)
        return step

    def __call__(self, event, state):
        if event != "before_update":
            return
        if self.lr_scale != 1.0:
            for group in state.optimizer.param_groups:
                group["lr"] *= self.lr_scale
        reason = self.detector.check(state.loss, state.grad_norm)
        if reason is None:
            self.detector.accept(state.loss)
            if self.policy == "rollback" and (self.snapshot is None or state.step - self.snapshot[0] >= self.snapshot_every):
                self.take_snapshot(state.step, state.optimizer)  # before this step's update: known-good weights
            return
        state.skip = True
        action = "skipped the update"
        if self.policy == "lower_lr":
            self.lr_scale *= self.lr_factor
            action += f", lr x{self.lr_scale:g} from now on"
        elif self.policy == "rollback":
            if self.snapshot is None:
                action += " (no snapshot yet to roll back to)"
            else:
                back = self.restore(state.optimizer)
                action += f", rolled back to step {back} (batches {back}..{state.step} skipped)"
        self.events.append((state.step, reason, action))
        if self.monitor is not None:
            self.monitor.note(state.step, reason.split(" (")[0])


class FaultInjector:
    """Inject faults at chosen steps: pass as a hook AND wrap the batch function with .wrap(batch_fn)."""

    def __init__(self, model: torch.nn.Module, faults: dict[int, str], lr_factor: float = 1e3,
                 param: str = "blocks.0.mlp.c_fc.weight", bit: int = 30, seed: int = 0):
        if not isinstance(faults, dict) or not faults:
            raise ValueError(f"faults must be a non-empty dict {{step: kind}}, got {faults!r}")
        for step, kind in faults.items():
            if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                raise ValueError(f"fault step must be an integer >= 0, got {step!r}")
            if kind not in FAULTS:
                raise ValueError(f"fault kind must be one of {FAULTS}, got {kind!r}")
        params = dict(model.named_parameters())
        if param not in params:
            raise ValueError(f"param {param!r} is not a parameter of the model (e.g. {next(iter(params))!r})")
        if not isinstance(bit, int) or not 0 <= bit < 32:
            raise ValueError(f"bit must be an integer in [0, 32) (a float32 has 32 bits), got {bit!r}")
        self.model, self.faults, self.lr_factor, self.param, self.bit = model, dict(faults), lr_factor, param, bit
        self.vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        self.gen = torch.Generator().manual_seed(seed)
        self.step = 0  # the step whose batches are being drawn
        self.injected: list[tuple[int, str]] = []
        self._armed = False
        blocks = getattr(model, "blocks", None)
        self._handle = blocks[0].register_forward_hook(self._nan_hook) if blocks is not None else None

    def _nan_hook(self, module, args, out):
        if self._armed:
            out = out.clone()
            out.view(-1)[0] = math.nan
            return out

    def wrap(self, batch_fn):
        def fn(split):
            batch = batch_fn(split)
            kind = self.faults.get(self.step)
            if split != "train" or kind is None:
                return batch
            if kind == "corrupt_batch":
                x = torch.randint(0, self.vocab, batch[0].shape, generator=self.gen).to(batch[0].device)
                y = torch.randint(0, self.vocab, batch[1].shape, generator=self.gen).to(batch[1].device)
                batch = (x, y, *batch[2:])
            elif kind == "nan":
                self._armed = True
            elif kind == "bit_flip" and (self.step, kind) not in self.injected:
                flip_bit(dict(self.model.named_parameters())[self.param], 0, self.bit)
            if (self.step, kind) not in self.injected:
                self.injected.append((self.step, kind))
            return batch
        return fn

    def __call__(self, event, state):
        if event == "after_backward":
            self._armed = False
        elif event == "before_update" and self.faults.get(state.step) == "lr_spike":
            for group in state.optimizer.param_groups:
                group["lr"] *= self.lr_factor
            self.injected.append((state.step, "lr_spike"))
        elif event == "after_step":
            self.step = state.step + 1

    def close(self):
        if self._handle is not None:
            self._handle.remove()


@torch.no_grad()
def flip_bit(p: torch.Tensor, index: int, bit: int) -> tuple[float, float]:
    """Flip bit `bit` of element `index` (flat) of a float32 tensor in place; returns (before, after)."""
    if p.dtype != torch.float32:
        raise ValueError(f"flip_bit needs a float32 tensor, got {p.dtype}")
    flat = p.view(-1)
    before = flat[index].item()
    as_int = flat[index:index + 1].view(torch.int32)
    as_int ^= torch.tensor(1 << bit if bit < 31 else -(1 << 31), dtype=torch.int32)
    return before, flat[index].item()
