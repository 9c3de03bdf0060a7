"""3D parallelism (data x pipeline x tensor = 2 x 2 x 2, and 2 x 4 x 1) on 8 gloo ranks, started two ways:
spawned by course.parallel.launch (one launch carries every case) and as two "nodes" of torchrun on this
machine. Each run is compared with one process training the same model on the same batches, in float64.
"""
import json
import os
import subprocess
import sys

import pytest

from course.model import ModelConfig, Transformer
from course.parallel import launch
from course.parallel.threed import make_mesh
from course.parallel.threed_experiments import Setup, suite
from course.parallelize import Plan, parallelize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = Setup()  # 4 layers, 2 heads, width 16, vocabulary 32, 8 sequences of 8 tokens, 1F1B with 2 micro-batches
CASES = [(2, 2, 2, "none", False), (2, 2, 2, "full", True), (2, 4, 1, "none", True)]  # (dp, pp, tp, recompute, zero1)
# float64 (eps 1.1e-16): the 3D run changes only the order of sums (the two data-parallel halves of the
# batch, the micro-batches, the tensor ranks' partial sums and log-sum-exps, the tied embedding's two
# gradients), each rounding by a few eps relative to its largest term; 3 AdamW steps keep relative errors
# relative. 1e-11 leaves a factor of ~10^4 over that and is far below what a missing, doubled or misplaced
# reduction gives (O(1e-3) and more: e.g. the every-copy norm below is about twice the right one).
TOL = 1e-11


@pytest.fixture(scope="module")
def spawned():
    return launch.run(suite, 8, SETUP, CASES, 4, timeout=600, threads=1).values  # values[rank][case]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_parameters_after_3_steps_equal_one_process(spawned, case):
    rows = [v[case] for v in spawned]
    assert max(r["param_diff"] for r in rows) < TOL
    for r in rows:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=TOL, abs=TOL)
        assert r["val"] == pytest.approx(r["ref_val"], rel=TOL, abs=TOL)
    assert {tuple(r["recompute"]) for r in rows} == {(CASES[case][3],)}
    assert {r["optimizer"] for r in rows} == {"ZeroRedundancyOptimizer" if CASES[case][4] else "AdamW"}


def test_gradient_norm_counts_each_parameter_once(spawned):
    """The clipped norm equals one process's at every step (and every step clips), while summing every
    rank's copies (TP-replicated LayerNorms and biases, the head's copy of wte, DP replicas) does not."""
    for case in range(len(CASES)):
        for r in (v[case] for v in spawned):
            assert r["grad_norm"] == pytest.approx(r["ref_norm"], rel=TOL)
            assert min(r["ref_norm"]) > SETUP.grad_clip
            for wrong, right in zip(r["every_copy_norm"], r["ref_norm"]):
                assert wrong > 1.5 * right


def test_zero1_keeps_half_the_optimizer_state(spawned):
    """Without ZeRO-1 both data-parallel replicas hold AdamW state for all their parameters; with it
    (PyTorch's ZeroRedundancyOptimizer over the data group) the pair holds it once between them."""
    plain = sum(v[0]["opt_state"] for v in spawned)
    zero1 = sum(v[1]["opt_state"] for v in spawned)
    assert plain == 2 * sum(v[0]["params_here"] for v in spawned)  # exp_avg + exp_avg_sq per element
    assert zero1 * 2 == plain


def test_rank_grid_is_megatron_order(spawned):
    groups = spawned[0][0]["groups"]
    assert groups["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # inside a node of 4
    assert groups["data"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups["pipeline"] == [[0, 4], [1, 5], [2, 6], [3, 7]]  # across the two nodes
    coords = {v[0]["rank"]: v[0]["coords"] for v in spawned}
    assert coords[5] == {"pipeline": 1, "data": 0, "tensor": 1}


def test_two_torchrun_nodes_equal_one_process(tmp_path):
    """Two torchrun agents (two "nodes" of 4 ranks) meet at a c10d rendezvous on this machine. c10d hands out
    the node ranks itself (--node-rank is ignored), so the check reads GROUP_RANK and LOCAL_RANK on every rank."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = launch.free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([torchrun, "--nnodes=2", f"--node-rank={n}", "--nproc-per-node=4",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "course.parallel.threed",
                               "--dp", "2", "--pp", "2", "--tp", "2", "--out", str(tmp_path / f"node{n}.json")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    (path,) = list(tmp_path.glob("node*.json"))  # written by global rank 0, on whichever agent holds it
    out = json.loads(path.read_text())
    assert out["mesh"] == {"pipeline": 2, "data": 2, "tensor": 2}
    assert out["param_diff"] < TOL and out["loss_diff"] < TOL and out["grad_norm_diff"] < TOL * max(out["ref_norm"])
    nodes = out["nodes"]
    assert nodes["checked"] and nodes["consecutive"] and nodes["tensor_inside_node"] and nodes["mesh_node_is_group_rank"]
    assert nodes["group_rank_of_rank"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert nodes["local_rank_of_rank"] == [0, 1, 2, 3] * 2


def test_degrees_must_multiply_to_the_world():
    with pytest.raises(ValueError, match=r"dp·pp·tp must equal the world size.*dp=3 \(pp=2, tp=2\) fits"):
        make_mesh(2, 2, 2, world_size=12)
    with pytest.raises(ValueError, match=r"2·2·2 = 8 != 6.*divisors \[1, 2, 3, 6\]"):
        make_mesh(2, 2, 2, world_size=6)
    with pytest.raises(ValueError, match="tp must be a positive integer"):
        make_mesh(2, 2, 0, world_size=8)


def test_tensor_group_must_stay_inside_a_node():
    with pytest.raises(ValueError, match=r"constraint: a tensor group must stay inside one node.*"
                                         r"gpus_per_node=4; tp=8 .*Nearest valid: tp=4 with dp=2"):
        make_mesh(1, 1, 8, gpus_per_node=4, world_size=8)
    with pytest.raises(ValueError, match=r"tp=3 does not"):
        make_mesh(2, 1, 3, gpus_per_node=4, world_size=6)
    assert make_mesh(2, 2, 2, gpus_per_node=4, world_size=8).spans_nodes("pipeline")


@pytest.mark.parametrize("kw, match", [
    ({"pipeline": "zigzag"}, "Plan.pipeline must be None or one of"),
    ({"pipeline": "1f1b", "data_parallel": "naive"}, "averages gradients over the mesh's 'data' ranks itself"),
    ({"pipeline": "1f1b", "shard": "zero3"}, "only None or 'zero1'"),
    ({"pipeline": "1f1b", "tensor_parallel": True, "sequence_parallel": True}, "sequence_parallel=True with Plan.pipeline"),
    ({"pipeline": "1f1b", "micro_batches": 0}, "Plan.micro_batches must be a positive integer"),
])
def test_bad_plans(kw, match):
    with pytest.raises(ValueError, match=match):
        Plan(**kw)


def test_pipeline_plan_needs_a_mesh():
    model = Transformer(ModelConfig.gpt(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match="needs mesh="):
        parallelize(model, Plan(pipeline="1f1b"))
