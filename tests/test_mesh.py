"""The rank mesh: coordinates, groups, nodes, and the same grid as PyTorch's init_device_mesh."""
import pytest

from course.costs import ring_bytes
from course.parallel import launch
from course.parallel.mesh import Mesh

import dp_workers


def test_row_major_layout_and_groups():
    m = Mesh(pipeline=2, data=2, tensor=2)
    assert m.coords(5) == {"pipeline": 1, "data": 0, "tensor": 1}
    assert m.groups("tensor") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # innermost: consecutive ranks
    assert m.groups("data") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert m.groups("pipeline") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    every = sorted(r for g in m.groups("data") for r in g)
    assert every == list(range(8))  # each dimension partitions the world


def test_tensor_inside_a_node_pipeline_across():
    m = Mesh(pipeline=2, data=2, tensor=4, gpus_per_node=8)
    m.check_within_node("tensor")  # 4 consecutive ranks: one node
    assert m.spans_nodes("pipeline") and not m.spans_nodes("tensor")
    assert [m.node_of(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    bad = Mesh(tensor=2, data=8, gpus_per_node=8)  # tensor outermost: neighbours 8 ranks apart
    with pytest.raises(ValueError, match="tensor groups span nodes"):
        bad.check_within_node("tensor")


@pytest.fixture(scope="module")
def four():
    return launch.run(dp_workers.mesh_vs_device_mesh, 4, {"data": 2, "tensor": 2}, timeout=120).values


def test_same_groups_as_torch_device_mesh(four):
    for r in four:
        for name, d in r["dims"].items():
            assert d["ours"] == d["torch"], (r["rank"], name)


def test_comm_per_dimension_sums_and_counts_its_own_group(four):
    for r in four:
        for name, d in r["dims"].items():
            assert d["sum"] == sum(g + 1 for g in d["ours"])  # summed over this group only
            assert d["comm"]["world"] == 2 and d["comm"]["group"] == name
            assert d["comm"]["bytes"] == {"all_reduce": ring_bytes("all_reduce", 6 * 4, 2)}
