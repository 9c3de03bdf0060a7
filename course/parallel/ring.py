"""The ring all-reduce written out with point-to-point sends, so its traffic is counted, not assumed.

Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of workstations": the
N ranks form a ring; the tensor is cut into N chunks. In N-1 reduce-scatter steps every rank sends
one chunk to its right neighbour and adds the chunk it receives from its left one, so that after
them rank r holds the full sum of chunk (r+1) mod N; in N-1 all-gather steps the summed chunks travel
round the ring once more. Every rank sends 2(N-1) chunks of n/N elements: 2(N-1)/N·n, the formula
`course.costs.ring_bytes("all_reduce", ...)` uses and NCCL's ring algorithm follows. Here the bytes
are counted where they leave the rank (`Comm.send`), so the formula is checked against traffic.

    total = ring_all_reduce(t, comm)   # t summed over comm's ranks, in place; comm.bytes["send"]
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Comm


def ring_all_reduce(t: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Sum `t` over `comm`'s ranks in place with 2(N-1) neighbour exchanges; returns t."""
    N, r = comm.world, comm.rank
    if N == 1:
        return t
    flat = t.view(-1)  # (n,) the in-place view every chunk below refers to
    if flat.numel() < N:
        raise ValueError(f"ring_all_reduce needs at least one element per rank: {flat.numel()} elements, {N} ranks")
    chunks = list(flat.tensor_split(N))  # N chunks of about n/N elements
    right, left = (r + 1) % N, (r - 1) % N
    for step in range(2 * (N - 1)):
        send_i = (r - step) % N  # reduce-scatter: the chunk I summed last; all-gather: the one I finished
        recv_i = (r - step - 1) % N
        incoming = torch.empty_like(chunks[recv_i])
        # even ranks send first, odd ranks receive first: blocking point-to-point cannot deadlock
        if r % 2 == 0:
            comm.send(chunks[send_i].contiguous(), right, name=f"ring step {step}")
            comm.recv(incoming, left, name=f"ring step {step}")
        else:
            comm.recv(incoming, left, name=f"ring step {step}")
            comm.send(chunks[send_i].contiguous(), right, name=f"ring step {step}")
        if step < N - 1:
            chunks[recv_i].add_(incoming)  # reduce-scatter: accumulate the running sum
        else:
            chunks[recv_i].copy_(incoming)  # all-gather: the finished sum replaces mine
    return t


def check_against_torch(n: int = 1001, seed: int = 0) -> dict:
    """On every rank: the ring's sum vs dist.all_reduce's (float64), and the bytes it sent."""
    comm = Comm()
    g = torch.Generator().manual_seed(seed + comm.rank)
    x = torch.randn(n, generator=g, dtype=torch.float64)
    ours, ref = x.clone(), x.clone()
    ring_all_reduce(ours, comm)
    dist.all_reduce(ref)
    return {"max_abs_diff": (ours - ref).abs().max().item(), "sent_bytes": comm.bytes["send"],
            "calls": dict(comm.calls), "n_bytes": x.numel() * x.element_size(), "world": comm.world}
