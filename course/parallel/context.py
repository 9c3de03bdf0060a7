"""Context parallelism: the sequence split over ranks, attention by ring (Liu et al. 2023, "Ring
Attention with Blockwise Transformers for Near-Infinite Context").

    core = RingAttention(comm, layout="zigzag")          # an attention core: core(q, k, v, causal, ...)
    model = apply_context_parallel(model, comm)          # every layer's core, positions, inputs split

Each of the N ranks holds T/N tokens of every sequence: its queries stay; its keys and values go
round the ring (rank r sends to r+1, receives from r-1), so after N steps every query block has seen
every key block, while each rank only ever holds two key/value blocks. The partial results of the
steps are merged exactly by the online-softmax rule (Milakov & Gimelshein 2018; FlashAttention):

    lse = log(e^lse_a + e^lse_b),   out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b

Backward is the same ring (FlashAttention-2's backward, Dao 2023, with the final out and lse):
keys/values travel again, each with the gradient accumulated for them so far, and the last hop brings
dK, dV home. Bytes per rank per attention layer, K and V of n = b·(T/N)·h elements each:
forward (N-1)·2n, backward (N-1)·2n + N·2n (`course.costs.ring_attention_bytes`).

Causal load balance. With the plain split rank r's queries see only ranks 0..r: rank N-1 computes N
blocks, rank 0 one (half masked). The zig-zag split (used by Megatron-LM's context parallelism and
ring-flash-attention) cuts the sequence into 2N chunks and gives rank i chunks i and 2N-1-i: every
rank then holds one early and one late chunk and computes the same number of (query, key) tiles.
Tiles, here chunk x chunk blocks, that a mask leaves empty are skipped, and a whole ring step is
skipped when all its tiles are (the keys still pass through). Chapter 03's patterns (`pattern=`) make
many steps empty: a causal local band (GPT-3's banded layers, sliding_window) needs only the own and
the previous rank's block once the window fits in a shard; a dilated band only as far as w·d reaches.
Patterns with global tokens or strided/random blocks (longformer, bigbird, strided, fixed) touch far
keys from almost every query block, so few steps can be skipped (counted in `stats`).

Inside a tile, attention is written out (scores of T/N x T/N); a GPU implementation calls a flash
kernel per step instead. Dropout on attention weights is not supported here (ValueError).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

LAYOUTS = ("contiguous", "zigzag")


def chunks_per_rank(layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 2 if layout == "zigzag" else 1


def check_sequence(T: int, world: int, layout: str) -> None:
    """ValueError unless T splits into world x chunks_per_rank equal chunks."""
    n = world * chunks_per_rank(layout)
    if T % n:
        near = sorted({max(n, T // n * n), -(-T // n) * n})
        raise ValueError(f"sequence length {T} does not split into {n} equal chunks ({layout} layout on {world} "
                         f"ranks): use a length in {near}, or a context-parallel size N with "
                         f"{'2N' if layout == 'zigzag' else 'N'} dividing {T}")


def shard_positions(T: int, rank: int, world: int, layout: str = "zigzag") -> torch.Tensor:
    """Global positions (T/world,) of rank's tokens: chunk `rank`, or chunks rank and 2N-1-rank."""
    check_sequence(T, world, layout)
    if layout == "contiguous":
        c = T // world
        return torch.arange(rank * c, (rank + 1) * c)
    c = T // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange((2 * world - 1 - rank) * c,
                                                                           (2 * world - rank) * c)])


def shard_sequence(t: torch.Tensor, rank: int, world: int, layout: str = "zigzag", dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a (B, T, ...) tensor along `dim`."""
    return t.index_select(dim, shard_positions(t.size(dim), rank, world, layout).to(t.device))


class PositionShard(nn.Embedding):
    """The position table (class swapped into model.wpe): looks up this rank's global positions.
    The model asks for positions arange(n); n is the local length if local_input, else the full one."""

    def forward(self, pos):
        n = pos.numel()
        T = n * self.world if self.local_input else n
        return super().forward(shard_positions(T, self.rank, self.world, self.layout).to(pos.device))


def shard_position_embedding(emb: nn.Embedding, layout: str, world: int, rank: int, local_input: bool):
    chunks_per_rank(layout)
    emb.__class__ = PositionShard
    emb.layout, emb.world, emb.rank, emb.local_input = layout, world, rank, local_input
    return emb


# ----------------------------------------------------------------------------- one ring


class RingPass:
    """One hop in flight: isend to rank+1 and irecv from rank-1 at once (no send/recv ordering to get
    right), so the step's compute overlaps the transfer, as in Liu et al. 2023. Counted on `comm` exactly
    as Comm.send / Comm.recv count (Comm has no asynchronous point-to-point; blocking dist.send under a
    TorchDispatchMode such as LiveTensors also takes seconds per call on gloo in torch 2.13)."""

    def __init__(self, comm, t: torch.Tensor, name: str):
        self.comm, self.name, self.sent = comm, name, t.contiguous()
        self.got = torch.empty_like(self.sent)
        self.start = comm.now()
        comm.calls["send"] += 1
        comm.calls["recv"] += 1
        comm.bytes["send"] += self.sent.numel() * self.sent.element_size()
        comm.bytes["recv"] += 0.0
        nxt = comm.global_rank((comm.rank + 1) % comm.world)
        prev = comm.global_rank((comm.rank - 1) % comm.world)
        self.works = [dist.isend(self.sent, nxt, group=comm.group), dist.irecv(self.got, prev, group=comm.group)]

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        self.comm.spans.append(("comm", self.name, self.start, self.comm.now()))
        return self.got


def _tiles(qpos, kpos, n_chunks: int, causal: bool, mask_mod, H: int):
    """(query slice, key slice, mask or None = all kept) of every tile with at least one kept pair."""
    c = qpos.numel() // n_chunks
    for a in range(n_chunks):
        for b in range(n_chunks):
            qp, kp = qpos[a * c:(a + 1) * c], kpos[b * c:(b + 1) * c]
            keep = torch.ones(1, c, c, dtype=torch.bool, device=qpos.device)  # (1, c, c)
            if causal:
                keep = keep & (kp.view(1, 1, c) <= qp.view(1, c, 1))
            if mask_mod is not None:
                h = torch.arange(H, device=qpos.device).view(H, 1, 1)
                keep = keep & mask_mod(torch.zeros((), dtype=torch.long), h, qp.view(1, c, 1), kp.view(1, 1, c))
            if keep.any():
                yield slice(a * c, (a + 1) * c), slice(b * c, (b + 1) * c), None if keep.all() else keep


def _scores(q, k, mask, scale):
    s = (q @ k.transpose(-2, -1)) * scale  # (B, H, tq, tk)
    return s if mask is None else s.masked_fill(~mask, float("-inf"))


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, comm, causal, layout, mask_mod, scale, stats):
        B, H, Tl, D = q.shape  # (B, H, T/N, hs): this rank's queries
        w, r = comm.world, comm.rank
        pos = [shard_positions(Tl * w, j, w, layout).to(q.device) for j in range(w)]
        n_chunks = chunks_per_rank(layout)
        out = torch.zeros_like(q)
        lse = torch.full((B, H, Tl), float("-inf"), dtype=q.dtype, device=q.device)  # (B, H, T/N)
        kv = torch.stack([k, v])  # (2, B, H, T/N, hs): what travels
        for step in range(w):
            src = (r - step) % w  # whose keys and values this rank holds now
            hop = RingPass(comm, kv, f"k, v (step {step})") if step < w - 1 else None  # next block, in flight
            with comm.span("compute", f"ring step {step}"):
                tiles = list(_tiles(pos[r], pos[src], n_chunks, causal, mask_mod, H))
                for qs, ks, mask in tiles:
                    s = _scores(q[:, :, qs], kv[0][:, :, ks], mask, scale)  # (B, H, c, c)
                    lse_b = torch.logsumexp(s, dim=-1)  # (B, H, c)
                    o_b = torch.exp(s - _finite(lse_b).unsqueeze(-1)) @ kv[1][:, :, ks]  # (B, H, c, hs)
                    new = torch.logaddexp(lse[:, :, qs], lse_b)
                    safe = _finite(new)
                    out[:, :, qs] = out[:, :, qs] * torch.exp(lse[:, :, qs] - safe).unsqueeze(-1) \
                        + o_b * torch.exp(lse_b - safe).unsqueeze(-1)
                    lse[:, :, qs] = new
                if stats is not None:
                    _count(stats, tiles, B, H, q.size(2) // n_chunks, step)
            if hop is not None:
                kv = hop.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.comm, ctx.causal, ctx.layout, ctx.mask_mod, ctx.scale = comm, causal, layout, mask_mod, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        comm, scale = ctx.comm, ctx.scale
        B, H, Tl, D = q.shape
        w, r = comm.world, comm.rank
        pos = [shard_positions(Tl * w, j, w, ctx.layout).to(q.device) for j in range(w)]
        delta = (dout * out).sum(-1, keepdim=True)  # (B, H, T/N, 1): rowsum(dO * O)
        safe_lse = _finite(lse).unsqueeze(-1)
        dq = torch.zeros_like(q)
        kv, dkv = torch.stack([k, v]), torch.zeros(2, *k.shape, dtype=k.dtype, device=k.device)
        for step in range(w):
            src = (r - step) % w
            hop = RingPass(comm, kv, f"k, v (backward step {step})") if step < w - 1 else None
            with comm.span("compute", f"ring step {step} (backward)"):
                for qs, ks, mask in _tiles(pos[r], pos[src], chunks_per_rank(ctx.layout), ctx.causal, ctx.mask_mod, H):
                    kt, vt = kv[0][:, :, ks], kv[1][:, :, ks]
                    p = torch.exp(_scores(q[:, :, qs], kt, mask, scale) - safe_lse[:, :, qs])  # (B, H, c, c)
                    dkv[1][:, :, ks] += p.transpose(-2, -1) @ dout[:, :, qs]  # dV
                    ds = p * (dout[:, :, qs] @ vt.transpose(-2, -1) - delta[:, :, qs])  # dS = P (dP - delta)
                    dq[:, :, qs] += (ds @ kt) * scale
                    dkv[0][:, :, ks] += (ds.transpose(-2, -1) @ q[:, :, qs]) * scale  # dK
            if hop is not None:
                kv = hop.wait()
            if w > 1:  # the last hop brings dK, dV home
                dkv = RingPass(comm, dkv, f"dk, dv (backward step {step})").wait()
        return dq, dkv[0], dkv[1], None, None, None, None, None, None


def _finite(x):
    return x.masked_fill(torch.isinf(x), 0.0)  # rows without any key yet: weight 0, not NaN


def _count(stats, tiles, B, H, c, step):
    stats["steps"] = stats.get("steps", 0) + 1
    stats["steps_skipped"] = stats.get("steps_skipped", 0) + (not tiles)
    stats["pairs_computed"] = stats.get("pairs_computed", 0) + B * H * c * c * len(tiles)
    stats["pairs_kept"] = stats.get("pairs_kept", 0) + sum(
        B * (H * c * c if m is None else int(m.sum()) * (H // m.size(0))) for _, _, m in tiles)
    stats.setdefault("computed_by_step", []).append(len(tiles))


def ring_attention(q, k, v, comm, causal: bool = True, layout: str = "zigzag", pattern=None, scale=None,
                   stats: dict | None = None):
    """Attention of this rank's queries over the whole sequence. q, k, v: (B, H, T/N, hs), the tokens
    `shard_positions(T, rank, N, layout)`; `pattern`: a course.sparse SparsePattern over T (its mask,
    AND causal). `stats` (a dict) accumulates steps, skipped steps, computed and kept (query, key) pairs."""
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must be (batch, heads, T/N, head_dim) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    T = q.size(2) * comm.world
    check_sequence(T, comm.world, layout)
    mask_mod = None
    if pattern is not None:
        if pattern.seq_len < T:
            raise ValueError(f"pattern covers {pattern.seq_len} tokens, the sequence has {T}")
        causal, mask_mod = causal or pattern.causal, pattern.mask_mod
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    return _Ring.apply(q, k, v, comm, causal, layout, mask_mod, scale, stats)


class RingAttention(nn.Module):
    """Attention core (course.model.set_attention) for context parallelism: q, k, v are this rank's
    tokens of every sequence. Masks come as a `pattern`; `stats` counts the work of every call."""

    def __init__(self, comm, layout: str = "zigzag", pattern=None):
        super().__init__()
        chunks_per_rank(layout)
        self.comm, self.layout, self.pattern, self.stats = comm, layout, pattern, {}

    def forward(self, q, k, v, causal: bool, attn_mask=None, dropout_p: float = 0.0):
        if attn_mask is not None:
            raise ValueError("RingAttention takes its mask as a pattern (RingAttention(comm, pattern=...)), "
                             "not attn_mask: each rank holds only its own tokens' rows")
        if dropout_p > 0:
            raise ValueError(f"RingAttention has no attention dropout (dropout_p={dropout_p}); use "
                             f"ModelConfig.dropout=0 with context parallelism")
        return ring_attention(q, k, v, self.comm, causal, self.layout, self.pattern, stats=self.stats)

    def extra_repr(self) -> str:
        return f"{self.layout} over {self.comm.world} ranks" + (f", {self.pattern.name}" if self.pattern else "")


def apply_context_parallel(model, comm, layout: str = "zigzag", method: str = "ring", pattern=None):
    """Every layer's attention core becomes RingAttention (or Ulysses' all-to-all around the layer's own
    core: method="ulysses", contiguous layout), and the position table looks up this rank's positions.
    Feed each rank `shard_sequence(x, rank, N, layout)`; every weight then sees only its rank's tokens,
    so average gradients over the same group: parallelize(model, Plan(data_parallel="naive"), comm=Comm(group))."""
    from ..model import attention_layers, set_attention
    if method not in ("ring", "ulysses"):
        raise ValueError(f"method must be 'ring' or 'ulysses', got {method!r}")
    if method == "ulysses":
        from .tensor import check_divisible
        from .ulysses import UlyssesAttention
        if layout != "contiguous":
            raise ValueError(f"Ulysses gathers the whole sequence in order: layout must be 'contiguous', got {layout!r}")
        check_divisible("n_head", model.config.n_head, comm.world, "context-parallel size")
        cores = [layer.core for layer in attention_layers(model)]
        set_attention(model, lambda i: UlyssesAttention(comm, cores[i]))
    else:
        set_attention(model, lambda i: RingAttention(comm, layout, pattern))
    shard_position_embedding(model.wpe, layout, comm.world, comm.rank, local_input=True)
    model.cp_comm = comm
    return model
