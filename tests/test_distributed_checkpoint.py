"""Distributed checkpoints (torch.distributed.checkpoint) of an FSDP2-sharded model: saved on 4 ranks,
synchronously and asynchronously (course's AsyncSaver and dcp.async_save), loaded on 2 ranks (resharded):
the same parameters and optimizer state, exactly (loading copies bytes; no arithmetic happens)."""
import pytest
import torch

from course.parallel import dcp, launch
from course.parallel import fault_experiments as fe

JOB = fe.Job()


def _equal(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _equal(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


def test_saved_on_4_ranks_resumes_on_2_with_the_same_state(tmp_path):
    saved = launch.run(fe.reshard_save, 4, str(tmp_path), JOB, timeout=400, threads=1).values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "sync", "torch"]  # no ".incomplete" left
    assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    loaded = launch.run(fe.reshard_load, 2, str(tmp_path), JOB, timeout=400, threads=1).values
    rows = JOB.vocab_size  # wte.weight is (vocab, n_embd): FSDP2 cuts dim 0
    assert saved[0]["local_shapes"]["wte.weight"] == (rows // 4, JOB.n_embd)
    assert loaded[0]["local_shapes"]["wte.weight"] == (rows // 2, JOB.n_embd)  # resharded, not copied whole
    want = saved[0]["state"]
    assert int(want["step"]) == JOB.every
    states = want["optim"]["state"]  # AdamW's, by parameter name; the tied lm_head.weight is wte.weight's
    assert set(states) <= set(want["model"]) and len(states) >= len(want["model"]) - 1
    for rank in range(2):
        for name, got in loaded[rank]["states"].items():
            _equal(got, want, f"rank {rank} {name}")


def test_a_distributed_checkpoint_that_did_not_finish_is_refused(tmp_path):
    (tmp_path / "ck.incomplete").mkdir()
    with pytest.raises(ValueError, match="not a complete distributed checkpoint.*did not finish"):
        dcp.load(tmp_path / "ck", None, None)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        dcp.save(tmp_path / "x", None, None, -2)
    with pytest.raises(ValueError, match="path must be a directory path"):
        dcp.load(3, None, None)
