"""Lesson 06 (tensor parallelism): a column-parallel and a row-parallel linear layer, on one process.

Megatron-LM (Shoeybi et al. 2019, section 3): the MLP's first weight is split by output features
("column parallel", A = [A_1, ..., A_N]: each rank computes its slice of the output, no communication
in forward), the second by input features ("row parallel": each rank multiplies its slice of the
input, and an all-reduce sums the partial outputs). With nn.Linear's weight of shape (out, in), a
column-parallel rank holds rows of the weight, a row-parallel rank holds columns.

REFERENCE WRITTEN HERE: the references are F.linear on the full weight (what the N ranks together
must reproduce); lesson 06's library layers are not needed. Comparisons are in float64: the claim is
mathematical equality, and a split matmul reorders at most the sums of one dot product (rounding far
below the 1e-12 used).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .core import Hint, call, close, exercise, expect_tensor

RTOL = ATOL = 1e-12


def _column_parallel_linear(x, weight, bias, rank, world):
    """Reference solution: this rank's output features. x (..., in) -> (..., out / world)."""
    return F.linear(x, weight.chunk(world, 0)[rank], bias.chunk(world, 0)[rank])


def _shape_hint(kind):
    return lambda e: (f"a shape error ({type(e).__name__}: {e}). weight has shape (out_features, in_features); "
                      f"{kind}")


@exercise("06", "column_parallel_linear", solution=_column_parallel_linear)
def check_column_parallel_linear(fn, rng, gen):
    """column_parallel_linear(x, weight, bias, rank, world) -> this rank's slice of F.linear(x, weight, bias):
    output features rank*out/world ... (rank+1)*out/world - 1 (contiguous slices)."""
    cases = 6
    for _ in range(cases):
        world = rng.choice([2, 4])
        n_in, n_out = rng.randint(2, 9), world * rng.randint(1, 4)
        x = torch.randn(rng.randint(1, 3), rng.randint(1, 4), n_in, generator=gen, dtype=torch.float64)
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        b = torch.randn(n_out, generator=gen, dtype=torch.float64)
        full = F.linear(x, w, b)  # (B, T, out)
        k = n_out // world
        for rank in range(world):
            got = call(fn, x.clone(), w.clone(), b.clone(), rank, world, errors={RuntimeError: _shape_hint(
                "column parallelism splits the OUTPUT features: rank r keeps weight rows r*k:(r+1)*k and the "
                "same slice of the bias")})
            what = f"column_parallel_linear(x, weight {tuple(w.shape)}, bias, rank={rank}, world={world})"
            expect_tensor(got, what, shape=(*x.shape[:-1], k))
            want = full[..., rank * k:(rank + 1) * k]
            if close(got, want, RTOL, ATOL):
                continue
            for other in range(world):
                if other != rank and close(got, full[..., other * k:(other + 1) * k], RTOL, ATOL):
                    raise Hint(f"{what} returned rank {other}'s features: rank {rank} holds output features "
                               f"{rank * k}..{(rank + 1) * k - 1}")
            if close(got, full[..., rank::world], RTOL, ATOL):
                raise Hint(f"{what}: you took every {world}-th output feature; each rank holds one contiguous "
                           f"slice (weight.chunk(world, dim=0)[rank])")
            if close(got, F.linear(x, w[rank * k:(rank + 1) * k]), RTOL, ATOL):
                raise Hint(f"{what}: the bias is missing: add the same slice of the bias, bias[{rank * k}:{(rank + 1) * k}]")
            raise Hint(f"{what} differs from output features {rank * k}..{(rank + 1) * k - 1} of F.linear(x, weight, bias)")
    return f"{cases} random layers, every rank of 2 or 4"


def _row_parallel_linear(x_shard, weight, bias, rank, world):
    """Reference solution: this rank's partial output; the bias is added once, on rank 0."""
    part = F.linear(x_shard, weight.chunk(world, 1)[rank])
    return part + bias if rank == 0 else part


@exercise("06", "row_parallel_linear", solution=_row_parallel_linear)
def check_row_parallel_linear(fn, rng, gen):
    """row_parallel_linear(x_shard, weight, bias, rank, world) -> this rank's partial output (..., out):
    x_shard holds input features rank*in/world ... (rank+1)*in/world - 1; the sum over ranks (what the
    all-reduce computes) must be F.linear(x, weight, bias), so add the bias on rank 0 only."""
    cases = 6
    for _ in range(cases):
        world = rng.choice([2, 4])
        n_in, n_out = world * rng.randint(1, 4), rng.randint(2, 9)
        x = torch.randn(rng.randint(1, 3), n_in, generator=gen, dtype=torch.float64)
        w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
        b = torch.randn(n_out, generator=gen, dtype=torch.float64)
        shards = x.chunk(world, -1)
        parts = []
        for rank in range(world):
            got = call(fn, shards[rank].clone(), w.clone(), b.clone(), rank, world, errors={RuntimeError: _shape_hint(
                "row parallelism splits the INPUT features: rank r multiplies its x_shard with weight columns "
                "r*k:(r+1)*k, i.e. weight.chunk(world, dim=1)[r]")})
            parts.append(expect_tensor(got, f"row_parallel_linear(x_shard, weight {tuple(w.shape)}, bias, rank={rank}, "
                                            f"world={world})", shape=(x.size(0), n_out)))
        total, full = sum(parts), F.linear(x, w, b)
        if close(total, full, RTOL, ATOL):
            continue
        if close(total, full + (world - 1) * b, RTOL, ATOL):
            raise Hint(f"the sum over {world} ranks holds the bias {world} times: add it on one rank only (rank 0)")
        if close(total, full - b, RTOL, ATOL):
            raise Hint("the bias is missing from the sum over ranks: add it on rank 0")
        raise Hint(f"the sum of the {world} partial outputs differs from F.linear(x, weight, bias): rank r "
                   f"multiplies x_shard with the columns of weight that match its input features")
    return f"{cases} random layers on 2 or 4 ranks, summed as the all-reduce would"
