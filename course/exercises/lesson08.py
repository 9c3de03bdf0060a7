"""Lesson 08 (3D parallelism): where a rank sits in the mesh, and which ranks form its group.

Reference: `course.parallel.mesh.Mesh` (row-major over the dimensions, outermost first, the last one
varying fastest: the layout of picotron's process-group manager and torchtitan's ParallelDims, which
keeps the innermost dimension, tensor parallelism, on consecutive ranks of one node as Megatron-LM
does; Narayanan et al. 2021, section 3).
"""
from __future__ import annotations

from course.parallel.mesh import Mesh

from .core import Hint, call, exercise

SHAPES = [dict(pipeline=2, data=2, tensor=2), dict(data=4, tensor=2), dict(pipeline=4, data=2, tensor=4),
          dict(pipeline=2, data=3, context=2, tensor=2), dict(data=8)]


def _rank_coords(rank, dims):
    return Mesh(**dims).coords(rank)


@exercise("08", "rank_coords", solution=_rank_coords)
def check_rank_coords(fn, rng, gen):
    """rank_coords(rank, dims) -> {dimension: coordinate}: dims maps names to sizes, outermost first;
    ranks are numbered row-major, so the LAST dimension varies fastest."""
    checked = 0
    for dims in SHAPES:
        mesh = Mesh(**dims)
        for rank in sorted(rng.sample(range(mesh.world_size), min(6, mesh.world_size))):
            what = f"rank_coords({rank}, {dims})"
            got = call(fn, rank, dict(dims), describe=what)
            want = mesh.coords(rank)
            if not isinstance(got, dict) or set(got) != set(dims):
                raise Hint(f"{what} should return a dict with one coordinate per dimension {list(dims)}")
            got = {k: int(v) for k, v in got.items()}
            if got == want:
                checked += 1
                continue
            flipped = Mesh(**dict(reversed(list(dims.items())))).coords(rank)
            if got == flipped:
                raise Hint(f"{what} = {got}: you let the FIRST dimension vary fastest. Ranks are row-major: "
                           f"the last dimension ({list(dims)[-1]}) varies fastest, so its groups are consecutive "
                           f"ranks (one node)")
            raise Hint(f"{what} = {got}, expected {want}")
    return f"{checked} ranks in {len(SHAPES)} meshes"


def _group_of(rank, dims, dim):
    return Mesh(**dims).group_of(dim, rank)


@exercise("08", "group_of", solution=_group_of)
def check_group_of(fn, rng, gen):
    """group_of(rank, dims, dim) -> sorted list of the ranks in `rank`'s `dim` group: the ranks whose
    coordinates equal rank's on every other dimension."""
    checked = 0
    for dims in SHAPES:
        mesh = Mesh(**dims)
        for dim in dims:
            rank = rng.randrange(mesh.world_size)
            what = f"group_of({rank}, {dims}, {dim!r})"
            got = call(fn, rank, dict(dims), dim, describe=what)
            want = mesh.group_of(dim, rank)
            try:
                got = sorted(int(r) for r in got)
            except (TypeError, ValueError):
                raise Hint(f"{what} should return a list of ranks") from None
            if got == want:
                checked += 1
                continue
            if len(got) != dims[dim]:
                raise Hint(f"{what} has {len(got)} ranks; a {dim} group has {dims[dim]} (the size of {dim!r})")
            if rank not in got:
                raise Hint(f"{what} = {got} does not contain rank {rank} itself")
            raise Hint(f"{what} = {got}, expected {want}: the ranks that differ from rank {rank} only in their "
                       f"{dim!r} coordinate")
    return f"{checked} groups in {len(SHAPES)} meshes"
