# %% [markdown]
# ## Your turn
#
# Where does a rank sit in a 3D mesh? `dims` maps dimension names to sizes, outermost first, e.g.
# `{"pipeline": 2, "data": 2, "tensor": 2}`; ranks are numbered row-major, so the last dimension varies
# fastest and tensor-parallel groups are consecutive ranks on one node (Narayanan et al. 2021, section 3).
# The checks compare with `course.parallel.mesh.Mesh`. Stuck? `print(solution("08.rank_coords"))`.
#
# **1. Coordinates of a rank.**

# %%
# NBVAL_CHECK_OUTPUT
from course.exercises import lesson08 as ex, solution


def rank_coords(rank, dims):
    """-> {dimension name: coordinate}."""
    raise NotImplementedError  # your code here


ok = ex.check_rank_coords(rank_coords)

# %% [markdown]
# **2. A rank's group along one dimension:** the ranks whose coordinates equal this rank's on every
# other dimension (for `"data"`, the ranks that all-reduce gradients together).

# %%
# NBVAL_CHECK_OUTPUT
def group_of(rank, dims, dim):
    """-> sorted list of ranks."""
    raise NotImplementedError  # your code here


ok = ex.check_group_of(group_of)

# %% [markdown]
# **3. Does every tensor group stay on one node?** With torchrun's numbering, node 0 holds ranks
# 0..g−1, node 1 ranks g..2g−1, and so on (g GPUs per node). Tensor parallelism talks in every layer,
# so a 3D run refuses a layout whose tensor group would cross nodes (`course.parallel.threed.make_mesh`).
# Use `group_of`'s idea: build the tensor groups, then look at `rank // gpus_per_node`.

# %%
# NBVAL_CHECK_OUTPUT
def tensor_inside_nodes(dims, gpus_per_node):
    """-> True if every tensor group's ranks are on one node."""
    raise NotImplementedError  # your code here


ok = ex.check_tensor_inside_nodes(tensor_inside_nodes)
