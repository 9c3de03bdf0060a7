"""A rank mesh: the world's ranks laid out as a grid over named dimensions, one process group each.

    mesh = Mesh(pipeline=2, data=2, tensor=2, gpus_per_node=4)   # outermost dimension first
    mesh.coords(5)            -> {"pipeline": 1, "data": 0, "tensor": 1}
    mesh.groups("tensor")     -> [[0, 1], [2, 3], [4, 5], [6, 7]]
    mesh.comm("data")         -> a course.parallel.comm.Comm on this rank's data-parallel group
    mesh.check_within_node("tensor")   # ValueError if a tensor group would span two nodes

Ranks are numbered row-major over the dimensions in the order given (the last one varies
fastest), the layout picotron's process-group manager and torchtitan's ParallelDims use. With
consecutive ranks on one node (torchrun's numbering), the innermost dimension stays inside a node:
Megatron-LM puts tensor parallelism there because it communicates inside every layer, and
pipeline or data parallelism across nodes (Narayanan et al. 2021, "Efficient large-scale language
model training on GPU clusters using Megatron-LM", section 3). `Mesh.device_mesh()` builds the
same grid with PyTorch's `init_device_mesh` (DeviceMesh), and a test checks the groups agree.

Process groups: `torch.distributed.new_group` is collective (every rank must create every group, in
the same order), so a Mesh made inside a process group creates all groups of all dimensions at once.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .comm import Comm

DIMS = ("pipeline", "data", "context", "tensor")  # names a chapter uses; any identifier works


class Mesh:
    """Ranks 0..world-1 as a grid of `dims` (name -> size, outermost first)."""

    def __init__(self, world_size: int | None = None, gpus_per_node: int | None = None, **dims: int):
        if not dims:
            raise ValueError("Mesh needs at least one dimension, e.g. Mesh(data=2)")
        for name, size in dims.items():
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ValueError(f"mesh dimension {name}={size!r}: sizes must be positive integers")
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_initialized() else math.prod(dims.values())
        product = math.prod(dims.values())
        if product != world_size:
            raise ValueError(f"mesh {' x '.join(f'{k}={v}' for k, v in dims.items())} = {product} ranks, but the "
                             f"world has {world_size}; {_nearest(dims, world_size)}")
        if gpus_per_node is not None and (not isinstance(gpus_per_node, int) or gpus_per_node < 1):
            raise ValueError(f"gpus_per_node must be a positive integer or None, got {gpus_per_node!r}")
        self.dims = dict(dims)
        self.names, self.shape = tuple(dims), tuple(dims.values())
        self.world_size, self.gpus_per_node = world_size, gpus_per_node
        self.ranks = torch.arange(world_size).view(self.shape)  # ranks[c0, c1, ...] = rank
        self._groups: dict[str, object] = {}
        if dist.is_initialized() and dist.get_world_size() == world_size:
            me = dist.get_rank()
            for name in self.names:  # collective: every rank creates every group, same order
                for ranks in self.groups(name):
                    pg = dist.new_group(ranks) if len(ranks) < world_size else None  # None: the world
                    if me in ranks:
                        self._groups[name] = pg

    def coords(self, rank: int) -> dict[str, int]:
        """Position of `rank` on each dimension."""
        self._check_rank(rank)
        where = (self.ranks == rank).nonzero()[0].tolist()
        return dict(zip(self.names, where))

    def groups(self, dim: str) -> list[list[int]]:
        """Every group of dimension `dim`: the ranks that differ only in their `dim` coordinate."""
        i = self._index(dim)
        moved = self.ranks.movedim(i, -1).reshape(-1, self.shape[i])  # (other coords, size of dim)
        return [row.tolist() for row in moved]

    def group_of(self, dim: str, rank: int) -> list[int]:
        """The ranks in `rank`'s group along `dim`."""
        self._check_rank(rank)
        return next(g for g in self.groups(dim) if rank in g)

    def group(self, dim: str):
        """This rank's torch process group along `dim` (None means the whole world)."""
        self._index(dim)
        if not self._groups and dist.is_initialized():
            raise RuntimeError("this Mesh was made outside the process group it is used in; make it after init")
        return self._groups.get(dim)

    def comm(self, dim: str) -> Comm:
        """An instrumented Comm on this rank's group along `dim`."""
        return Comm(self.group(dim) if dist.is_initialized() else None, name=dim)

    def size(self, dim: str) -> int:
        return self.shape[self._index(dim)]

    def node_of(self, rank: int) -> int:
        """Node holding `rank`, with consecutive ranks filling a node (torchrun's numbering)."""
        self._check_rank(rank)
        if self.gpus_per_node is None:
            raise ValueError("node_of needs gpus_per_node (Mesh(..., gpus_per_node=8))")
        return rank // self.gpus_per_node

    def spans_nodes(self, dim: str) -> bool:
        return any(len({self.node_of(r) for r in g}) > 1 for g in self.groups(dim))

    def check_within_node(self, dim: str) -> None:
        """ValueError if a group of `dim` spans two nodes, with what would fit."""
        if self.spans_nodes(dim):
            i = self._index(dim)
            stride = math.prod(self.shape[i + 1:])  # rank distance between neighbours in a `dim` group
            raise ValueError(f"{dim} groups span nodes: a group of {dim}={self.shape[i]} ranks spaced {stride} apart "
                             f"covers {stride * (self.shape[i] - 1) + 1} consecutive ranks, more than a node of "
                             f"{self.gpus_per_node} GPUs; make {dim} the innermost dimension (stride 1) with "
                             f"{dim} <= {self.gpus_per_node}, or shrink the dimensions inside it")

    def device_mesh(self, device_type: str = "cpu"):
        """The same grid as PyTorch's DeviceMesh (init_device_mesh), with the same dimension names."""
        from torch.distributed.device_mesh import init_device_mesh
        return init_device_mesh(device_type, self.shape, mesh_dim_names=self.names)

    def _index(self, dim: str) -> int:
        if dim not in self.dims:
            raise ValueError(f"unknown mesh dimension {dim!r}; this mesh has {list(self.names)}")
        return self.names.index(dim)

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in [0, {self.world_size}), got {rank!r}")

    def __repr__(self) -> str:
        nodes = f", {self.gpus_per_node} per node" if self.gpus_per_node else ""
        return f"Mesh({' x '.join(f'{k}={v}' for k, v in self.dims.items())} = {self.world_size} ranks{nodes})"


def _nearest(dims: dict[str, int], world: int) -> str:
    """A suggestion that fits: change the first dimension so the product is the world size."""
    first, rest = next(iter(dims)), math.prod(list(dims.values())[1:])
    if world % rest == 0:
        return f"with the other sizes fixed, {first}={world // rest} fits"
    return f"the sizes must multiply to {world} (its divisors: {[d for d in range(1, world + 1) if world % d == 0]})"
