"""Pipeline parallelism on real gloo ranks: one launch of 4 ranks carries every distributed check.

p = 4 runs on the world; p = 2 runs on both "pipeline" groups of Mesh(pipeline=2, data=2) (ranks
{0, 2} and {1, 3}, so group ranks differ from world ranks). Everything compares in float64.
"""
import pytest
import torch

from course.parallel import launch
from course.parallel.comm import Comm
from course.parallel.pipeline import PipelineModel, Stage, run_schedule, timeline
from course.parallel.pp_experiments import Setup, suite
from course.parallel.schedules import make, simulate, validate

SETUP = Setup()  # 8 layers, so p·v = 8 (p = 4, v = 2) splits evenly
# a covering set (time): every schedule at both p, every m in {1, 2, 4, 8} at both p
P4 = [("gpipe", 1, 1), ("gpipe", 2, 1), ("1f1b", 4, 1), ("zb-h1", 8, 1), ("interleaved", 8, 2)]
P2 = [("gpipe", 2, 1), ("gpipe", 8, 1), ("1f1b", 1, 1), ("1f1b", 4, 1), ("zb-h1", 1, 1), ("zb-h1", 8, 1),
      ("interleaved", 2, 2), ("interleaved", 4, 2)]
TORCH = [("gpipe", 4, 1), ("1f1b", 4, 1), ("interleaved", 4, 2), ("zb-h1", 4, 1), ("csv:1f1b", 4, 1),
         ("csv:zb-h1", 4, 1)]
# float64 (eps 1.1e-16): pipelining changes only the order of a few sums (micro-batch gradients, the two
# halves of the tied embedding's gradient, I + W), each rounding by ~eps relative to the largest term;
# 1e-12 leaves a factor of 10^4 for the depth of the model and is still far below any real error.
TOL = 1e-12


@pytest.fixture(scope="module")
def runs():
    values = launch.run(suite, 4, SETUP, P4, P2, ("1f1b", 2, 1, 2), TORCH, timeout=400, threads=1).values
    # per case: the ranks' results in pipeline order; p = 2 twice (world ranks 0, 2 and 1, 3)
    out = {("p4",) + c: [v["p4"][i] for v in values] for i, c in enumerate(P4)}
    for i, c in enumerate(P2):
        for name, ranks in (("p2a", (0, 2)), ("p2b", (1, 3))):
            out[(name,) + c] = [values[r]["p2"][i] for r in ranks]
    return out, values


def _cases(runs):
    for key, rows in runs[0].items():
        yield key, make(key[1], len(rows), key[2], key[3]), rows


def test_loss_and_gradients_equal_the_unsplit_model(runs):
    for key, sched, rows in _cases(runs):
        assert [r["rank"] for r in rows] == list(range(sched.p)), key
        assert max(r["grad_rel_diff"] for r in rows) < TOL, key
        assert rows[-1]["loss_diff"] < TOL and all(r["loss"] is None for r in rows[:-1]), key


def test_measured_peak_live_activations(runs):
    """Counted from the tensors autograd actually keeps: what the schedule predicts, and the papers'
    numbers: GPipe m, 1F1B p - r (<= p), ZB-H1 <= p, interleaved rank 0 v·p + p - 1 chunks."""
    for key, sched, rows in _cases(runs):
        measured = [r["peak_live"] for r in rows]
        assert measured == validate(sched), key
        p, m, v = sched.p, sched.m, sched.v
        if sched.name == "gpipe":
            assert measured == [m] * p
        elif sched.name == "1f1b":
            assert measured == [min(p - r, m) for r in range(p)]
        elif sched.name == "zb-h1":
            assert max(measured) <= p
        else:
            assert measured[0] == min(v * p + p - 1, v * m)
        assert all(b > 0 for b in (r["peak_bytes"] for r in rows))


def test_executor_runs_the_ir_in_the_simulators_order(runs):
    """Each rank did what its list says, in the simulator's order, and the measured clock (one monotonic
    clock for all processes) shows every cross-stage dependency: an action starts after its input exists."""
    for key, sched, rows in _cases(runs):
        measured = timeline([r["spans"] for r in rows], sched.p)
        simulated = simulate(sched)
        for r in range(sched.p):
            assert [a for a, _, _ in measured.events[r]] == sched.compute(r) == [a for a, _, _ in simulated.events[r]]
        end = {(a.kind, a.stage, a.mb): e for ev in measured.events for a, _, e in ev}
        for ev in measured.events:
            for a, start, _ in ev:
                if a.kind == "F" and a.stage > 0:
                    assert start >= end[("F", a.stage - 1, a.mb)], (key, a)
                if a.kind in ("B", "I") and a.stage < sched.n_stages - 1:
                    before = end.get(("B", a.stage + 1, a.mb), end.get(("I", a.stage + 1, a.mb)))
                    assert start >= before, (key, a)


def test_point_to_point_bytes_are_hops_of_bsh(runs):
    """Every send carries one micro-batch's activations or their gradient: (B/m)·s·h float64 elements."""
    for key, sched, rows in _cases(runs):
        hop = SETUP.batch_size // sched.m * SETUP.seq_len * SETUP.n_embd * 8
        for r, row in enumerate(rows):
            sends = sum(a.kind.startswith("SEND") for a in sched.ranks[r])
            assert row["sent_bytes"] == sends * hop, key


def test_training_through_the_loop(runs):
    """course.train.train with a PipelineModel (1F1B, p=2, m=2) = the unsplit model: losses, gradient norms
    (summed over stages), validation loss and every parameter after 2 AdamW steps."""
    for v in runs[1]:
        t = v["train"]
        for a, b in zip(t["loss"] + t["val"] + t["grad_norm"], t["ref_loss"] + t["ref_val"] + t["ref_norm"]):
            assert abs(a - b) < 1e-10 * max(1.0, abs(b))  # float64, as above, through 2 AdamW steps
        assert t["param_diff"] < 1e-10


def test_pytorch_pipelining_on_the_same_stages(runs):
    res = [v["torch"] for v in runs[1]]
    if not all(r["available"] for r in res):
        pytest.skip(next(r["reason"] for r in res if not r["available"]))
    for r in res:
        for c in r["cases"]:
            assert c["grad_rel_diff"] < TOL, c["schedule"]
            assert c["loss_diff"] is None or c["loss_diff"] < TOL, c["schedule"]
            # our IR = PyTorch's action order (its Schedule1F1B table, for display only, numbers the last
            # rank's forwards from 1 in torch 2.13: not compared); csv:* ran our IR in PyTorch's runtime
            if c["schedule"] != "1f1b":
                assert c["order"] == c["ours"], c["schedule"]


def test_split_backward_equals_full_backward():
    """I then W (weight gradients deferred, in real autograd) = B, in float64, and W holds what it needs."""
    model = SETUP.model()
    h = torch.randn(4, SETUP.seq_len, SETUP.n_embd, dtype=torch.float64)
    grads = []
    for split in (False, True):
        st = Stage(model, 1, 2)
        x = h.clone().requires_grad_()
        out = st(x).square().mean()
        st.store.key = (1, 0) if split else None
        out.backward()
        st.store.key = None
        if split:
            assert all(q.grad is None for n, q in st.named_parameters() if n.endswith("weight") and q.dim() == 2)
            st.store.flush((1, 0))
        grads.append([x.grad] + [q.grad for q in st.parameters()])
    assert all((a - b).abs().max() < TOL * b.abs().max() for a, b in zip(*grads))


def test_bad_input_is_refused():
    model = SETUP.model()
    with pytest.raises(ValueError, match="8 layers do not split evenly into 3 stages"):
        Stage(model, 0, 3)
    with pytest.raises(ValueError, match="8 layers do not split evenly into 16 stages"):
        Stage(model, 0, 16)  # p·v = 4·4 does not divide 8 layers
    sched = make("1f1b", 2, 4)
    x, y = SETUP.batch()
    with pytest.raises(ValueError, match="does not split into m=4"):
        run_schedule({0: Stage(model, 0, 2)}, sched, Comm(), x[:6], y[:6])
    with pytest.raises(ValueError, match="p=2 ranks, the pipeline group has 1"):
        run_schedule({0: Stage(model, 0, 2)}, sched, Comm(), x, y)
    with pytest.raises(ValueError, match="p=2 ranks, the pipeline group has 1"):
        PipelineModel(model, sched, Comm())
