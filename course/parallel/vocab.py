"""The vocabulary split over the tensor-parallel ranks: embedding, cross-entropy, and the model's loss.

Megatron-LM (Shoeybi et al. 2019, section 3) splits the embedding E (V x h) by rows: rank i owns
tokens i·V/t .. (i+1)·V/t, looks up the ids it owns, writes zeros for the others, and an all-reduce
(or, under sequence parallelism, a reduce-scatter along the sequence) adds the t partial tables.
With the output layer tied to E, the logits come out split by vocabulary, (B, T, V/t) per rank, and
are never gathered: cross-entropy needs, per token, only the log-sum-exp over the whole vocabulary
and the target's logit. Each rank computes its own logsumexp_i and the target logit if it owns the
target (0 otherwise); one all-gather of these 2 numbers per token per rank gives

    loss = logsumexp_i(lse_i) - sum_i target_i.

(Megatron uses three all-reduces: max, sum of exponentials, target logit; gathering the per-rank
log-sum-exps is one collective and as stable.) The gradient is local: softmax - onehot on this
rank's columns. Its bytes, 2·B·T numbers per rank, do not grow with V.

`TensorParallelTransformer` is the class `apply_tensor_parallel` swaps into a Transformer: the same
hidden_states, a forward whose loss is the vocabulary-parallel one, gradient-norm clipping that sums
the shards' squares over the group, and `full_state_dict()` that reassembles every master weight.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import Transformer
from .tensor import ReduceFromTensorParallel, ScatterToSequenceParallel, _block, shard_param


class VocabParallelEmbedding(nn.Module):
    """Rows i·V/t .. (i+1)·V/t of the token embedding. idx (B, T) -> (B, T, C), or (B, T/t, C) under
    sequence parallelism."""

    def __init__(self, full: nn.Embedding, comm, sequence_parallel: bool = False):
        super().__init__()
        V = full.num_embeddings
        self.weight = shard_param(full.weight, 0, _block(V, comm.world), comm.world, comm.rank)  # (V/t, C)
        self.start, self.vocab_size = comm.rank * V // comm.world, V
        self.comm, self.sequence_parallel = comm, sequence_parallel

    def forward(self, idx):
        local = idx - self.start  # (B, T)
        outside = (local < 0) | (local >= self.weight.size(0))
        e = F.embedding(local.clamp(0, self.weight.size(0) - 1), self.weight)  # (B, T, C)
        e = e.masked_fill(outside.unsqueeze(-1), 0.0)  # this rank's part of the sum
        reduce = ScatterToSequenceParallel if self.sequence_parallel else ReduceFromTensorParallel
        return reduce.apply(e, self.comm, "wte")

    def extra_repr(self) -> str:
        return f"tokens {self.start}..{self.start + self.weight.size(0) - 1} of {self.vocab_size}"


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy over targets != -100 from vocabulary-sharded logits (N, V/t)."""

    @staticmethod
    def forward(ctx, logits, targets, start, comm):
        Vl = logits.size(-1)
        lse = torch.logsumexp(logits, dim=-1)  # (N,) over this rank's columns
        mine = (targets >= start) & (targets < start + Vl)
        local = (targets - start).clamp(0, Vl - 1)
        target_logit = logits.gather(1, local.unsqueeze(1)).squeeze(1) * mine  # (N,), 0 if not ours
        stats = torch.stack([lse, target_logit])  # (2, N)
        every = stats.new_empty((comm.world * 2, stats.size(1)))  # (t*2, N): Comm gathers along dim 0
        comm.all_gather(every, stats, name="cross-entropy (log-sum-exp, target logit)")
        every = every.view(comm.world, 2, -1)  # (t, 2, N)
        total_lse = torch.logsumexp(every[:, 0], dim=0)  # (N,): over the whole vocabulary
        valid = targets != -100
        n = valid.sum()
        loss = ((total_lse - every[:, 1].sum(0)) * valid).sum() / n
        ctx.save_for_backward(logits, total_lse, local, mine & valid, valid)
        ctx.n = n
        return loss

    @staticmethod
    def backward(ctx, grad):
        logits, total_lse, local, hit, valid = ctx.saved_tensors
        g = torch.exp(logits - total_lse.unsqueeze(1))  # (N, V/t): softmax on this rank's columns
        g[hit, local[hit]] -= 1.0
        g = g * (valid.unsqueeze(1) * (grad / ctx.n))
        return g, None, None, None


def vocab_parallel_cross_entropy(logits, targets, comm, start: int):
    """logits (B, T, V/t) of tokens start.. start+V/t; targets (B, T) ids in the whole vocabulary."""
    return VocabParallelCrossEntropy.apply(logits.flatten(0, -2), targets.reshape(-1), start, comm)


class TensorParallelTransformer(Transformer):
    """A Transformer whose parts were split by apply_tensor_parallel (class swapped in, not built)."""

    def forward(self, idx, targets=None, attn_mask=None):
        """idx (B, T); returns (logits of this rank's vocabulary shard (B, T, V/t), mean loss or None)."""
        h = self.head_transform(self.hidden_states(idx, attn_mask))  # (B, T, C) or (B, T/t, C) under SP
        logits = self.lm_head(h)  # (B, T, V/t)
        loss = None
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.shape != idx.shape:
                raise ValueError(f"targets must be a tensor of the same shape as idx {tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}")
            loss = vocab_parallel_cross_entropy(logits, targets, self.tp_comm, self.wte.start)
        return logits, loss

    def generate(self, *args, **kwargs):
        raise ValueError("generate() needs the full logits; a tensor-parallel model holds a vocabulary shard "
                         "(gather full_state_dict() into a plain Transformer to sample)")

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, T, V/t) shards -> (B, T, V) (for checks: training never needs it)."""
        comm = type(self.tp_comm)(self.tp_comm.group, name="gather for checks")
        every = logits.new_empty((comm.world * logits.size(0),) + logits.shape[1:])
        comm.all_gather(every, logits.detach().contiguous())
        return torch.cat(every.chunk(comm.world), dim=-1)  # (B, T, V)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients to global L2 norm <= max_norm; shards' squares summed over the group,
        whole parameters (identical on every rank) counted once. Returns the norm before clipping."""
        grads = [p for p in self.parameters() if p.grad is not None]
        zero = torch.zeros((), dtype=torch.float64, device=grads[0].device)
        sharded = sum((p.grad.double().pow(2).sum() for p in grads if hasattr(p, "tp_dim")), zero)
        whole = sum((p.grad.double().pow(2).sum() for p in grads if not hasattr(p, "tp_dim")), zero)
        self.tp_param_comm.all_reduce(sharded, name="gradient norm")
        norm = (sharded + whole).sqrt()
        if math.isfinite(max_norm) and norm > max_norm:
            for p in grads:
                p.grad.mul_(max_norm / (float(norm) + 1e-6))  # torch's clip_grad_norm_ rule
        return norm

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, by the single-process model's names (shards put back in place)."""
        return self._assemble({n: (p, p.detach()) for n, p in self.named_parameters()})

    @torch.no_grad()
    def full_grads(self) -> dict[str, torch.Tensor]:
        """Every gradient whole, by name (for checks)."""
        return self._assemble({n: (p, p.grad if p.grad is not None else torch.zeros_like(p))
                               for n, p in self.named_parameters()})

    def _assemble(self, tensors: dict) -> dict[str, torch.Tensor]:
        comm = type(self.tp_comm)(self.tp_comm.group, name="gather for checks")
        out = {}
        for name, (p, t) in tensors.items():
            if not hasattr(p, "tp_dim"):
                out[name] = t.clone()
                continue
            shard = t.movedim(p.tp_dim, 0).contiguous()
            every = shard.new_empty((comm.world * shard.size(0),) + shard.shape[1:])
            comm.all_gather(every, shard)
            every = every.view((comm.world,) + shard.shape)
            full = shard.new_empty((sum(len(i) for i in p.tp_indices),) + shard.shape[1:])
            for r, index in enumerate(p.tp_indices):
                full[index] = every[r]
            out[name] = full.movedim(0, p.tp_dim)
        return out
