"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) and sequence parallelism (Korthikanti et al. 2022).

    model = apply_tensor_parallel(Transformer(cfg), Mesh(tensor=2), sequence_parallel=False)
    logits, loss = model(idx, targets)   # logits: this rank's vocabulary shard (B, T, V/t)

One layer's matrices are split over the t ranks of the "tensor" group. Megatron's MLP (section 3,
figure 3a) splits the first weight A = [A_1 .. A_t] by columns, so GeLU(X A_i) needs no
communication, and the second B by rows, so the outputs Y_i B_i are partial sums: one all-reduce.
Attention (figure 3b) splits by heads: rank i owns heads i·a/t .. (i+1)·a/t of Q, K, V (columns of
c_attn) and the matching rows of c_proj. Two conjugate autograd functions carry all of it:

    f   identity forward, all-reduce backward   (before a column-parallel linear)
    g   all-reduce forward, identity backward   (after a row-parallel linear)

so a block costs exactly 2 all-reduces of (B, T, C) forward and 2 backward. Sequence parallelism
(Korthikanti et al. 2022, section 4.2.2) replaces each all-reduce by its halves: g becomes a
reduce-scatter along the sequence (the LayerNorms, dropouts and residual adds between blocks then
run on T/t tokens per rank) and f an all-gather; the same bytes on the wire, and every activation
between the linears divided by t (34·sbh/t + 5·as²b/t per layer instead of sbh(10 + 24/t + 5as/ht)).
Like Megatron-LM's LinearWithGradAccumulationAndAsyncCommunication, a column-parallel linear keeps
only its input *shard* for backward and all-gathers it again there (2 extra all-gathers per layer,
counted under their own name, "re-gather"). Parameters that sequence parallelism leaves whole
(LayerNorms, row-parallel biases, position embeddings) see only T/t tokens, so their gradients are
all-reduced over the group (a second, parameter-sized Comm, `model.tp_param_comm`).

Every layer slices one full "master" weight (picotron's approach), so the parallel model starts
exactly where the single-process model starts. The vocabulary is split too (section 3, "input
embedding"): `course.parallel.vocab` holds the vocabulary-parallel embedding and cross-entropy.

How the model is changed from outside (course.model knows nothing of this): Linear modules are
replaced by parallel ones with the same call; SelfAttention and Transformer instances get their class
swapped (FSDP2's trick) for subclasses whose forward works on local widths (a/t heads through the
same `core(q, k, v, causal, attn_mask, dropout_p)` contract) and computes the vocabulary-parallel
loss. Dropout: ranks start from one seed, so replicated dropouts stay identical; under sequence
parallelism the shards then share mask patterns (Megatron forks the RNG per rank; not done here).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import SelfAttention

# ----------------------------------------------------------------------------- collectives on (B, T, C)


def gather_sequence(comm, x, name=""):
    """(B, T/t, C) shards -> (B, T, C), rank r's tokens at r·T/t.."""
    shard = x.transpose(0, 1).contiguous()  # (T/t, B, C): Comm gathers along dim 0
    full = shard.new_empty((comm.world * shard.size(0),) + shard.shape[1:])  # (T, B, C)
    comm.all_gather(full, shard, name=name)
    return full.transpose(0, 1).contiguous()  # (B, T, C)


def scatter_sequence(comm, x, name=""):
    """(B, T, C) partial sums -> this rank's (B, T/t, C) slice of their sum."""
    full = x.transpose(0, 1).contiguous()  # (T, B, C)
    if full.size(0) % comm.world:
        raise ValueError(f"sequence length {full.size(0)} is not divisible by the tensor-parallel size "
                         f"{comm.world}: sequence parallelism needs T % t == 0 (e.g. T={_round(full.size(0), comm.world)})")
    out = full.new_empty((full.size(0) // comm.world,) + full.shape[1:])  # (T/t, B, C)
    comm.reduce_scatter(out, full, name=name)
    return out.transpose(0, 1).contiguous()  # (B, T/t, C)


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, comm, name):
        ctx.comm, ctx.name = comm, name
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        ctx.comm.all_reduce(grad, name=f"{ctx.name} (backward)")
        return grad, None, None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, comm, name):
        x = x.clone(memory_format=torch.contiguous_format)
        comm.all_reduce(x, name=name)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class ScatterToSequenceParallel(torch.autograd.Function):
    """g under sequence parallelism: reduce-scatter along T forward, all-gather backward."""

    @staticmethod
    def forward(ctx, x, comm, name):
        ctx.comm, ctx.name = comm, name
        return scatter_sequence(comm, x, name)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence(ctx.comm, grad, f"{ctx.name} (backward)"), None, None


class GatherLinear(torch.autograd.Function):
    """f under sequence parallelism, fused with the linear: all-gather x along T, x W^T + b; keeps
    only the shard and gathers it again in backward, whose input gradient is reduce-scattered."""

    @staticmethod
    def forward(ctx, x, weight, bias, comm, name):
        ctx.save_for_backward(x, weight)  # x: (B, T/t, in), this rank's tokens only
        ctx.comm, ctx.name, ctx.has_bias = comm, name, bias is not None
        return F.linear(gather_sequence(comm, x, name), weight, bias)  # (B, T, out/t)

    @staticmethod
    def backward(ctx, grad):  # grad: (B, T, out/t)
        x, weight = ctx.saved_tensors
        full = gather_sequence(ctx.comm, x, f"{ctx.name} (re-gather)")  # (B, T, in)
        grad_x = scatter_sequence(ctx.comm, grad @ weight, f"{ctx.name} (backward)")  # (B, T/t, in)
        grad_w = grad.flatten(0, -2).T @ full.flatten(0, -2)  # (out/t, in)
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None


# ----------------------------------------------------------------------------- parallel layers


def shard_param(full: torch.Tensor, dim: int, index_of, world: int, rank: int) -> nn.Parameter:
    """This rank's slice of a master weight; `p.tp_indices[r]` are rank r's indices along `p.tp_dim`,
    so any rank can put the full tensor back together (course.parallel.vocab.full_state_dict)."""
    indices = [index_of(r) for r in range(world)]
    p = nn.Parameter(full.detach().index_select(dim, indices[rank]).clone())
    p.tp_dim, p.tp_indices = dim, indices
    return p


def _block(n: int, world: int, groups: int = 1):
    """index_of(r): rank r's 1/world of each of `groups` equal consecutive groups of n rows."""
    size, part = n // groups, n // groups // world
    return lambda r: torch.cat([torch.arange(g * size + r * part, g * size + (r + 1) * part) for g in range(groups)])


class ColumnParallelLinear(nn.Module):
    """Y_i = X A_i: this rank's output features. Input replicated (B, T, in), or under sequence
    parallelism (B, T/t, in); output (B, T, out/t). `groups=3` splits q, k, v alike (heads)."""

    def __init__(self, full: nn.Linear, comm, sequence_parallel: bool = False, name: str = "", groups: int = 1):
        super().__init__()
        index_of = _block(full.out_features, comm.world, groups)
        self.weight = shard_param(full.weight, 0, index_of, comm.world, comm.rank)  # (out/t, in)
        self.bias = None if full.bias is None else shard_param(full.bias, 0, index_of, comm.world, comm.rank)
        self.comm, self.sequence_parallel, self.name = comm, sequence_parallel, name

    def forward(self, x):
        if self.sequence_parallel:
            return GatherLinear.apply(x, self.weight, self.bias, self.comm, self.name)
        return F.linear(CopyToTensorParallel.apply(x, self.comm, self.name), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.name}: shard {tuple(self.weight.shape)} of {self.comm.world}, sp={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """Y = sum_i X_i B_i: input (B, T, in/t) -> all-reduce -> (B, T, out), or under sequence
    parallelism reduce-scatter -> (B, T/t, out). The bias is added once, after the sum."""

    def __init__(self, full: nn.Linear, comm, sequence_parallel: bool = False, name: str = ""):
        super().__init__()
        self.weight = shard_param(full.weight, 1, _block(full.in_features, comm.world), comm.world, comm.rank)
        self.bias = None if full.bias is None else nn.Parameter(full.bias.detach().clone())
        self.comm, self.sequence_parallel, self.name = comm, sequence_parallel, name

    def forward(self, x):
        y = F.linear(x, self.weight)  # (B, T, out): this rank's partial sum
        reduce = ScatterToSequenceParallel if self.sequence_parallel else ReduceFromTensorParallel
        y = reduce.apply(y, self.comm, self.name)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.name}: shard {tuple(self.weight.shape)} of {self.comm.world}, sp={self.sequence_parallel}"


class ParallelSelfAttention(SelfAttention):
    """SelfAttention with this rank's n_head/t heads: c_attn column-parallel (q, k, v by heads),
    c_proj row-parallel; the attention core is the layer's own, called with fewer heads."""

    def forward(self, x, attn_mask=None):
        qkv = self.c_attn(x)  # (B, T, 3C/t); T is the whole sequence, also under sequence parallelism
        B, T, W = qkv.shape
        w = W // 3  # this rank's width C/t = (n_head/t) * hs
        q, k, v = qkv.split(w, dim=2)  # 3 x (B, T, C/t)
        q = q.view(B, T, self.n_head, w // self.n_head).transpose(1, 2)  # (B, nh/t, T, hs)
        k = k.view(B, T, self.n_head, w // self.n_head).transpose(1, 2)  # (B, nh/t, T, hs)
        v = v.view(B, T, self.n_head, w // self.n_head).transpose(1, 2)  # (B, nh/t, T, hs)
        if attn_mask is not None and attn_mask.dim() >= 3 and attn_mask.size(-3) == self.full_heads > 1:
            attn_mask = attn_mask.narrow(-3, self.head_offset, self.n_head)  # this rank's heads
        dropout_p = self.dropout if self.training else 0.0
        y = self.core(q, k, v, causal=self.causal, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, w)  # (B, T, C/t)
        return self.resid_dropout(self.c_proj(y))


# ----------------------------------------------------------------------------- applying it


def check_divisible(name: str, value: int, t: int, what: str = "tensor-parallel size") -> None:
    """ValueError naming the numbers and the nearest sizes that would work."""
    if value % t:
        divisors = [d for d in range(1, value + 1) if value % d == 0]
        near = sorted(divisors, key=lambda d: (abs(d - t), -d))[:2]
        raise ValueError(f"{name}={value} is not divisible by the {what} {t}: use a {what} in "
                         f"{sorted(near)} (divisors of {value}: {divisors}) or {name}={_round(value, t)}")


def _round(value: int, t: int) -> int:
    return -(-value // t) * t  # the next multiple of t


def apply_tensor_parallel(model, group, sequence_parallel: bool = False, within_node: bool = True):
    """Split `model` (a course.model.Transformer) in place over `group`: a Mesh (its "tensor" dimension,
    checked to stay inside a node when the mesh knows gpus_per_node and within_node is True) or a Comm.
    Returns the model; `model.tp_comm` counts the activation collectives, `model.tp_param_comm` the rest."""
    from ..model import Transformer
    from .mesh import Mesh
    from .context import shard_position_embedding
    from .vocab import TensorParallelTransformer, VocabParallelEmbedding
    if type(model) is not Transformer:
        raise TypeError(f"apply_tensor_parallel needs a course.model.Transformer, got {type(model).__name__}")
    if isinstance(group, Mesh):
        t = group.size("tensor")
        if within_node and group.gpus_per_node is not None:
            group.check_within_node("tensor")
    else:
        t = group.world
    cfg = model.config
    check_divisible("n_head", cfg.n_head, t)
    check_divisible("n_embd", cfg.n_embd, t)
    check_divisible("vocab_size", cfg.vocab_size, t)
    comm = group.comm("tensor") if isinstance(group, Mesh) else group
    if comm.world != t:
        raise ValueError(f"the mesh's tensor dimension has {t} ranks but this process's group has {comm.world}: "
                         f"make the Mesh inside the process group (after init), with tensor={comm.world} or less")
    param_comm = type(comm)(comm.group, name=f"{comm.name} (parameter gradients)")
    sp = bool(sequence_parallel)
    for i, block in enumerate(model.blocks):
        attn, mlp, at = block.attn, block.mlp, f"blocks.{i}."
        attn.c_attn = ColumnParallelLinear(attn.c_attn, comm, sp, at + "attn.c_attn", groups=3)
        attn.c_proj = RowParallelLinear(attn.c_proj, comm, sp, at + "attn.c_proj")
        attn.full_heads, attn.n_head, attn.head_offset = attn.n_head, attn.n_head // t, comm.rank * attn.n_head // t
        attn.__class__ = ParallelSelfAttention
        mlp.c_fc = ColumnParallelLinear(mlp.c_fc, comm, sp, at + "mlp.c_fc")
        mlp.c_proj = RowParallelLinear(mlp.c_proj, comm, sp, at + "mlp.c_proj")
    model.wte = VocabParallelEmbedding(model.wte, comm, sp)
    model.lm_head = ColumnParallelLinear(model.lm_head, comm, sp, "lm_head")
    model.lm_head.weight = model.wte.weight  # still tied: one vocabulary shard
    if sp:
        shard_position_embedding(model.wpe, "contiguous", comm.world, comm.rank, local_input=False)
        for p in model.parameters():  # whole but fed T/t tokens: sum their gradients over the group
            if not hasattr(p, "tp_dim"):
                p.register_hook(lambda grad, p=p: _all_reduce_grad(param_comm, grad))
    model.tp_comm, model.tp_param_comm, model.sequence_parallel = comm, param_comm, sp
    model.__class__ = TensorParallelTransformer
    return model


def _all_reduce_grad(comm, grad):
    grad = grad.clone(memory_format=torch.contiguous_format)
    comm.all_reduce(grad, name="sequence-parallel parameter gradient")
    return grad
