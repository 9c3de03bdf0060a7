"""Pipeline parallelism: the Transformer cut into stages, run by a schedule on real ranks.

    stages = {s: Stage(model, s, sched.n_stages) for s in range(comm.rank, sched.n_stages, sched.p)}
    result = run_schedule(stages, make("1f1b", p, m), comm, idx, targets)   # one step on this rank

`Stage(model, s, S)` copies layers [s·L/S, (s+1)·L/S) of a `course.model.Transformer` (the model
itself is unchanged); stage 0 also takes the embeddings, the last stage the final LayerNorm and the
head. The head's weight is tied to the token embedding (GPT-2), and those two live on different
ranks: each keeps a copy and the two gradients are summed after every step (`sync_tied_grads`), as
Megatron-LM does over its "embedding group" (Shoeybi et al. 2019; Narayanan et al. 2021).

`run_schedule` walks this rank's action list of a `course.parallel.schedules.Schedule`: F runs the
stage on micro-batch i, B runs autograd backward from its output (the loss on the last stage),
SEND/RECV move (b, s, h) activations and their gradients between neighbouring stages of the
pipeline group of a `course.parallel.comm.Comm` (counted in its calls and bytes). Sends are posted
(isend) and the rank carries on, as in Megatron-LM's and PyTorch's runtimes; a RECV blocks until its
data is there. Each message has its own tag, so a receive matches its own send whatever order the
two ranks' lists put them in. The schedule is validated first (`schedules.validate`): what runs
cannot deadlock. Each compute action is a span on the Comm's timeline.

Zero-bubble schedules (Qi et al. 2023) split B into I and W. Here every nn.Linear of a stage is a
`SplitLinear`: during I its backward computes the input (and bias) gradient and leaves (input,
output gradient) in the stage's `WeightGradStore`; W later forms weight.grad += gᵀx. LayerNorm
and embedding gradients are cheap and are made during I. The result equals B exactly in exact
arithmetic; tests compare in float64.

`ActivationMemory` follows every tensor autograd saves (saved_tensors_hooks), tagged by (stage,
micro-batch), until its storage is freed: the measured peak of live micro-batches and bytes.
`PipelineModel` gives the loop (`course.train.train`) a model whose forward runs a whole step.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..model import check_tokens, run_blocks
from .comm import Comm
from .schedules import COMPUTE, Action, Schedule, Timeline, forward_only, validate


class WeightGradStore:
    """(weight, input, output gradient) left by I passes, per (stage, micro-batch), until W."""

    def __init__(self):
        self.key, self.pending, self.keep = None, {}, None  # key set while an I pass runs

    def put(self, weight, x, g):
        self.pending.setdefault(self.key, []).append((weight, x, g))
        if self.keep:
            self.keep(g, self.key)  # the output gradient is held until W: count it as activation memory

    @torch.no_grad()  # x may require grad: dw must not start a graph that keeps g alive
    def flush(self, key):
        """The W pass: weight.grad += gᵀ x for every linear of this micro-batch."""
        for weight, x, g in self.pending.pop(key, []):
            dw = g.reshape(-1, g.size(-1)).T @ x.reshape(-1, x.size(-1))  # (out, in)
            weight.grad = dw if weight.grad is None else weight.grad + dw


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x)
        ctx.weight = weight  # the Parameter itself (a saved tensor would unpack as an alias, whose .grad is lost)
        ctx.store, ctx.has_bias = store, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):  # g (..., out)
        (x,), weight = ctx.saved_tensors, ctx.weight
        gx = g @ weight if ctx.needs_input_grad[0] else None  # (..., in)
        gb = g.reshape(-1, g.size(-1)).sum(0) if ctx.has_bias else None
        if ctx.store.key is not None:  # an I pass: the weight gradient waits for W
            ctx.store.put(weight, x, g)
            gw = None
        else:
            gw = g.reshape(-1, g.size(-1)).T @ x.reshape(-1, x.size(-1))
        return gx, gw, gb, None


class SplitLinear(nn.Module):
    """nn.Linear (same parameters) whose weight gradient an I pass defers to the store."""

    def __init__(self, linear: nn.Linear, store: WeightGradStore):
        super().__init__()
        self.weight, self.bias, self.store = linear.weight, linear.bias, store

    def forward(self, x):
        return _LinearFn.apply(x, self.weight, self.bias, self.store)


class Stage(nn.Module):
    """Stage `index` of `n_stages` of a Transformer: its share of the blocks (+ embeddings / head)."""

    def __init__(self, model, index: int, n_stages: int, split_backward: bool = True):
        super().__init__()
        L = model.config.n_layer
        if not isinstance(n_stages, int) or n_stages < 1 or L % n_stages:
            raise ValueError(f"{L} layers do not split evenly into {n_stages} stages (p·v): equal stages are what "
                             f"the schedules assume; use p·v in {[d for d in range(1, L + 1) if L % d == 0]} "
                             f"or a model with a multiple of {n_stages} layers")
        if not 0 <= index < n_stages:
            raise ValueError(f"stage index must be in [0, {n_stages}), got {index!r}")
        k = L // n_stages
        self.index, self.n_stages, self.first_layer = index, n_stages, index * k
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.vocab_size, self.block_size = model.config.vocab_size, model.config.block_size
        if self.is_first:
            self.wte, self.wpe, self.drop = (copy.deepcopy(m) for m in (model.wte, model.wpe, model.drop))
        self.blocks = nn.ModuleList(copy.deepcopy(model.blocks[i]) for i in range(index * k, (index + 1) * k))
        if self.is_last:
            self.ln_f, self.head_transform = copy.deepcopy(model.ln_f), copy.deepcopy(model.head_transform)
            self.lm_head = nn.Linear(model.config.n_embd, model.config.vocab_size, bias=False)
            self.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())  # this rank's copy of wte
        self.runner = run_blocks  # the model's seam for the blocks: a recomputation policy installs its own
        self.store = WeightGradStore()
        if split_backward:
            for parent in list(self.modules()):
                for name, child in parent.named_children():
                    if isinstance(child, nn.Linear):
                        setattr(parent, name, SplitLinear(child, self.store))

    def forward(self, x):
        """(B, T) token ids on stage 0, (B, T, C) activations elsewhere -> (B, T, C), or logits (B, T, V)."""
        if self.is_first:
            check_tokens(x, self.vocab_size)
            if x.size(1) > self.block_size:
                raise ValueError(f"sequence length {x.size(1)} exceeds block_size={self.block_size}")
            x = self.drop(self.wte(x) + self.wpe(torch.arange(x.size(1), device=x.device)))  # (B, T, C)
        x = self.runner(self.blocks, x)  # (B, T, C)
        if self.is_last:
            x = self.lm_head(self.head_transform(self.ln_f(x)))  # (B, T, V)
        return x

    def loss(self, logits, targets, n_tokens):
        """This micro-batch's share of the batch's mean loss: its summed cross-entropy / all target tokens."""
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-100,
                               reduction="sum") / n_tokens

    def full_name(self, name: str) -> str:
        """This stage's parameter name in the unsplit model ("blocks.0.x" -> "blocks.<layer>.x")."""
        if name.startswith("blocks."):
            i, rest = name[len("blocks."):].split(".", 1)
            return f"blocks.{self.first_layer + int(i)}.{rest}"
        return "wte.weight" if name == "lm_head.weight" else name


class ActivationMemory:
    """Storages autograd saves (and W passes hold), tagged by (stage, micro-batch), until freed."""

    def __init__(self, params=()):
        self.skip = {p.untyped_storage().data_ptr() for p in params}  # weights are not activations
        self.owner: dict[int, tuple] = {}  # storage pointer -> (tag, bytes)
        self.bytes_by_tag: Counter = Counter()
        self.current = self.peak_bytes = self.peak_live = 0
        self.tag = None

    def keep(self, t: torch.Tensor, tag=None):
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if n == 0 or ptr in self.skip or ptr in self.owner or not t.is_floating_point():
            return  # weights and integer inputs (token ids, targets: the data) are not activations
        tag = self.tag if tag is None else tag
        self.owner[ptr] = (tag, n)
        self.bytes_by_tag[tag] += n
        self.current += n
        self.peak_bytes = max(self.peak_bytes, self.current)
        self.peak_live = max(self.peak_live, len(self.bytes_by_tag))
        weakref.finalize(st, self._free, ptr)

    def _free(self, ptr):
        if ptr not in self.owner:
            return
        tag, n = self.owner.pop(ptr)
        self.current -= n
        self.bytes_by_tag[tag] -= n
        if not self.bytes_by_tag[tag]:
            del self.bytes_by_tag[tag]

    @contextmanager
    def recording(self, tag):
        self.tag = tag
        # pack returns a detached alias: the tensor itself may be the node's own output, and holding it
        # (with its grad_fn) from the node would be a reference cycle that outlives backward
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (self.keep(t), t.detach())[1], lambda t: t):
            yield
        self.tag = None


def _tag(a: Action, m: int) -> int:
    """One tag per message of a step, so a receive matches its own send whatever the order on the link."""
    return (2 * a.stage + a.kind.endswith("_B")) * m + a.mb


def _isend(comm: Comm, t: torch.Tensor, dst: int, tag: int):
    """Posted send (the rank carries on), counted by comm."""
    return comm.send(t, dst, name=f"send tag {tag}", tag=tag, async_op=True)


def _recv(comm: Comm, t: torch.Tensor, src: int, tag: int) -> torch.Tensor:
    comm.recv(t, src, name=f"recv tag {tag}", tag=tag)
    return t


@dataclass
class StepResult:
    loss: float | None  # on the rank holding the last stage
    spans: list  # (kind, action, start, end) of compute actions, perf_counter seconds
    peak_live: int  # most (stage, micro-batch) activations alive at once on this rank, measured
    peak_bytes: int  # their bytes at the peak
    sent_bytes: float  # point-to-point bytes this rank sent
    overruns: int = 0  # compute actions longer than action_time asked for


def run_schedule(stages: dict, schedule: Schedule, comm: Comm, idx, targets, action_time=None) -> StepResult:
    """Run this rank's part of `schedule` on the batch (idx, targets) (B, T). Gradients accumulate
    in the stages' .grad; the loss is the mean over all target tokens, as the unsplit model's.
    action_time(action) -> seconds pads each compute action to that length (timing experiments)."""
    p, m, S, r = schedule.p, schedule.m, schedule.n_stages, comm.rank
    validate(schedule)
    if idx.size(0) % m:
        raise ValueError(f"batch of {idx.size(0)} sequences does not split into m={m} equal micro-batches")
    if comm.world != p:
        raise ValueError(f"schedule is for p={p} ranks, the pipeline group has {comm.world}")
    if sorted(stages) != list(range(r, S, p)):
        raise ValueError(f"rank {r} must hold stages {list(range(r, S, p))}, got {sorted(stages)}")
    xs = [c.clone() for c in idx.chunk(m)]  # own storage per micro-batch, so its memory is its own
    ys = [c.clone() for c in targets.chunk(m)]
    n_tokens = (targets != -100).sum()
    one = next(iter(stages.values()))
    shape, dtype = (idx.size(0) // m, idx.size(1), one.blocks[0].ln_1.weight.size(0)), one.blocks[0].ln_1.weight.dtype
    device = one.blocks[0].ln_1.weight.device  # receive buffers where the stage computes (a GPU under NCCL)
    memory = ActivationMemory([q for st in stages.values() for q in st.parameters()])
    grad = torch.is_grad_enabled()
    for st in stages.values():
        st.store.keep = memory.keep
    inputs, outputs, grads, loss, overruns, sends = {}, {}, {}, 0.0, 0, []
    sent_before, start_spans = comm.bytes["send"], len(comm.spans)
    for a in schedule.ranks[r]:
        key, st = (a.stage, a.mb), stages.get(a.stage)
        if a.kind == "RECV_F":  # from the previous stage's SEND_F, tagged as that send
            with comm.span("wait", str(a)):
                x = _recv(comm, torch.empty(shape, dtype=dtype, device=device), schedule.rank_of(a.stage - 1),
                          _tag(a, m))
            inputs[key] = x.requires_grad_(grad)
        elif a.kind == "RECV_B":
            with comm.span("wait", str(a)):
                grads[key] = _recv(comm, torch.empty(shape, dtype=dtype, device=device),
                                   schedule.rank_of(a.stage + 1), _tag(a, m))  # no name bound: freed when used
        elif a.kind.startswith("SEND"):
            if a.kind == "SEND_F":
                t, to = (outputs[key].detach() if grad else outputs.pop(key)), Action(a.stage + 1, "RECV_F", a.mb)
            else:
                t, to = inputs.pop(key).grad, Action(a.stage - 1, "RECV_B", a.mb)
            t = t.contiguous()
            sends = [(w, x) for w, x in sends if not w.is_completed()]  # keep a tensor until its send is done
            sends.append((_isend(comm, t, schedule.rank_of(to.stage), _tag(to, m)), t))
        else:
            t0 = time.perf_counter()
            with comm.span(a.kind, str(a)):
                if a.kind == "F":
                    with memory.recording(key) if grad else contextlib.nullcontext():
                        out = st(xs[a.mb] if st.is_first else inputs[key])
                        if st.is_last:
                            out = st.loss(out, ys[a.mb], n_tokens)
                            loss += out.item()
                    if grad or not st.is_last:
                        outputs[key] = out
                    del out  # a name left bound would keep this micro-batch's graph alive
                    if not st.is_first and not grad:
                        del inputs[key]
                elif a.kind in ("B", "I"):
                    st.store.key = key if a.kind == "I" else None
                    torch.autograd.backward(outputs.pop(key), None if st.is_last else grads.pop(key))
                    st.store.key = None
                elif a.kind == "W":
                    st.store.flush(key)
                if action_time is not None:  # pad to the given length; count actions that ran longer
                    left = action_time(a) - (time.perf_counter() - t0)
                    overruns += left < 0
                    time.sleep(max(0.0, left))
    for work, _ in sends:
        work.wait()
    sent = comm.bytes["send"] - sent_before
    spans = [s for s in comm.spans[start_spans:] if s[0] in COMPUTE]
    return StepResult(loss if S - 1 in stages else None, spans, memory.peak_live, memory.peak_bytes, sent, overruns)


def sync_tied_grads(stages: dict, comm: Comm, n_stages: int) -> None:
    """Sum the gradients of the tied embedding: stage 0's wte and the last stage's head copy."""
    if 0 in stages and n_stages - 1 in stages:  # one rank holds both (never with p >= 2)
        raise ValueError("first and last stage on one rank: use p >= 2")
    if 0 in stages:
        w = stages[0].wte.weight
        other = torch.empty_like(w)
        comm.recv(other, comm.world - 1, name="tied grad")
        w.grad = other if w.grad is None else w.grad + other
        comm.send(w.grad, comm.world - 1, name="tied grad")
    elif n_stages - 1 in stages:
        w = stages[n_stages - 1].lm_head.weight
        comm.send(w.grad if w.grad is not None else torch.zeros_like(w), 0, name="tied grad")
        total = torch.empty_like(w)
        comm.recv(total, 0, name="tied grad")
        w.grad = total


def rank_stages(model, schedule: Schedule, rank: int, split_backward: bool = True) -> dict[int, Stage]:
    """The stages `rank` holds: r, r + p, ..., as {stage index: Stage}."""
    return {s: Stage(model, s, schedule.n_stages, split_backward) for s in range(rank, schedule.n_stages, schedule.p)}


def timeline(spans_by_rank: list[list], p: int) -> Timeline:
    """A Timeline (as the simulator makes) from each rank's measured compute spans."""
    return Timeline(p, [[(Action.parse(name), start, end) for _, name, start, end in spans] for spans in spans_by_rank])


class _Deliver(torch.autograd.Function):
    """The loop's loss.backward(): add the gradients the schedule made, times d(outer loss)/d(loss)."""

    @staticmethod
    def forward(ctx, anchor, loss, grads):
        ctx.grads = grads
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        for q, new in ctx.grads:
            q.grad = new * g if q.grad is None else q.grad + new * g
        return None, None, None


class PipelineModel(nn.Module):
    """This rank's stages behind the interface `course.train.train` expects: model(idx, targets) runs
    one whole schedule (every forward and backward) and returns (None, loss), the same loss on every
    rank; loss.backward() then hands over the gradients the schedule computed (scaled, so the loop's
    division by grad_accum still works). Under torch.no_grad (evaluation) it runs forwards only."""

    def __init__(self, model, schedule: Schedule, comm: Comm):
        super().__init__()
        if comm.world != schedule.p:
            raise ValueError(f"schedule is for p={schedule.p} ranks, the pipeline group has {comm.world}")
        self.schedule, self.comm = schedule, comm
        self.stages = nn.ModuleDict({str(s): st for s, st in rank_stages(model, schedule, comm.rank).items()})
        self._anchor = torch.zeros((), requires_grad=True)  # lets the returned loss have a backward
        self.last = None  # the last step's StepResult

    def forward(self, idx, targets=None, attn_mask=None):
        if attn_mask is not None or targets is None:
            raise ValueError("PipelineModel needs targets (the last stage computes the loss) and takes no attn_mask")
        sched, stages = self.schedule, {int(k): v for k, v in self.stages.items()}
        grad = torch.is_grad_enabled()
        params = list(self.parameters())
        before = [q.grad for q in params]
        for q in params:
            q.grad = None
        self.last = run_schedule(stages, sched if grad else forward_only(sched.p, sched.m, sched.v), self.comm,
                                 idx, targets)
        if grad:
            self.sync_grads(stages)
        loss = torch.tensor([self.last.loss or 0.0], dtype=params[0].dtype, device=params[0].device)
        self.comm.broadcast(loss, src=sched.p - 1, name="loss")
        new = [(q, q.grad) for q in params if q.grad is not None]
        for q, old in zip(params, before):
            q.grad = old
        return None, (_Deliver.apply(self._anchor, loss[0], new) if grad else loss[0])

    def sync_grads(self, stages: dict) -> None:
        """After the schedule: the tied embedding's two gradients summed (a 3D model adds data parallelism)."""
        sync_tied_grads(stages, self.comm, self.schedule.n_stages)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """torch's clip_grad_norm_ over the whole pipeline: squares summed over ranks (the head's copy
        of the tied embedding counted once, on stage 0)."""
        key = str(self.schedule.n_stages - 1)
        head = self.stages[key].lm_head.weight if key in self.stages else None
        grads = [q.grad for q in self.parameters() if q.grad is not None and q is not head]
        sq = torch.tensor([sum(float((g.double() ** 2).sum()) for g in grads)], dtype=torch.float64,
                          device=next(self.parameters()).device)
        self.comm.all_reduce(sq, name="grad norm")
        norm = math.sqrt(sq.item())
        coef = min(1.0, max_norm / (norm + 1e-6))
        for q in self.parameters():
            if q.grad is not None:
                q.grad.mul_(coef)
        return norm
