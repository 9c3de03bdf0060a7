"""A rank dies: in a 2-rank data-parallel run started by torchrun --max-restarts=1, rank 1 SIGKILLs itself
in the middle of step 7 (once: a marker file). torchrun stops the other rank, starts both again, they
resume from the newest checkpoint every rank holds intact (step 6), and the run ends with the losses and
parameters of the run nobody killed, bit for bit (the same float operations in the same order)."""
import os
import subprocess
import sys
from dataclasses import replace

import torch

from course.parallel import launch
from course.parallel import fault_experiments as fe

JOB = fe.Job()


def test_a_rank_killed_mid_step_is_restarted_by_torchrun_and_ends_equal(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
           "-m", "course.parallel.fault_experiments", str(tmp_path / "killed")]  # = torchrun ...
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "exitcode: -9" in proc.stderr or "exitcode  : -9" in proc.stderr or "-9" in proc.stderr  # the kill happened
    killed = torch.load(tmp_path / "killed" / "result.pt", weights_only=True)
    assert (tmp_path / "killed" / "killed").exists()
    assert killed["restart"] == 1 and killed["resumed_at"] == 6  # the second attempt, from step 6's checkpoints
    straight = launch.run(fe.elastic_train, 2, str(tmp_path / "straight"), replace(JOB, kill_step=-1),
                          timeout=400, threads=1).values[0]
    assert straight["resumed_at"] is None and len(straight["train_loss"]) == JOB.steps
    assert killed["train_loss"] == straight["train_loss"]
    assert killed["params"].keys() == straight["params"].keys()
    assert all(torch.equal(killed["params"][k], straight["params"][k]) for k in straight["params"])
