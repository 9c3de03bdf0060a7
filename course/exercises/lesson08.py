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


NODE_CASES = [(dict(pipeline=2, data=2, tensor=2), 4), (dict(pipeline=2, data=2, tensor=2), 2),
              (dict(data=2, tensor=4), 4), (dict(data=2, tensor=4), 2), (dict(data=4, tensor=3), 4),
              (dict(data=4, tensor=3), 6), (dict(tensor=2, data=4), 4), (dict(tensor=2, data=4), 8),
              (dict(pipeline=2, tensor=2, data=2), 4), (dict(pipeline=4, data=2, tensor=8), 8)]


def _tensor_inside_nodes(dims, gpus_per_node):
    return not Mesh(gpus_per_node=gpus_per_node, **dims).spans_nodes("tensor")


@exercise("08", "tensor_inside_nodes", solution=_tensor_inside_nodes)
def check_tensor_inside_nodes(fn, rng, gen):
    """tensor_inside_nodes(dims, gpus_per_node) -> True when every tensor group's ranks are on one node
    (torchrun's numbering: ranks 0..g-1 on node 0, g..2g-1 on node 1, ...). The check that
    course.parallel.threed.make_mesh makes before a 3D run starts."""
    for dims, g in NODE_CASES:
        what = f"tensor_inside_nodes({dims}, gpus_per_node={g})"
        got = call(fn, dict(dims), g, describe=what)
        mesh = Mesh(gpus_per_node=g, **dims)
        want = not mesh.spans_nodes("tensor")
        if not isinstance(got, bool):
            raise Hint(f"{what} should return True or False, got {got!r}")
        if got == want:
            continue
        spanning = [grp for grp in mesh.groups("tensor") if len({mesh.node_of(r) for r in grp}) > 1]
        group = spanning[0] if spanning else None
        if not want and dims["tensor"] <= g:
            nodes = sorted({mesh.node_of(r) for r in group})
            raise Hint(f"{what} = True, but the tensor group {group} sits on nodes {nodes}: a group no larger than a "
                       f"node can still cross a node boundary (its ranks are spaced "
                       f"{group[1] - group[0]} apart, or tp does not divide gpus_per_node)")
        if not want:
            raise Hint(f"{what} = True, but tensor group {group} has more ranks than a node has GPUs")
        raise Hint(f"{what} = False, but every tensor group is inside a node: {mesh.groups('tensor')}")
    return f"{len(NODE_CASES)} layouts"
