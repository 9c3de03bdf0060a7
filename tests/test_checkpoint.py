"""Checkpoints of the whole training state: a run SIGKILLed (mid-step, mid-write, before the rename) and
resumed equals the uninterrupted one bit for bit; damaged files are refused and the previous one used;
never a partial file under a final name; bad inputs and unusable directories fail clearly."""
import errno
import os
import random
import warnings

import numpy as np
import pytest
import torch

from course import checkpoint as ck
from course.lessons import fault_tolerance as ft
from course.model import ModelConfig, Transformer
from course.train import TrainConfig, make_optimizer, train

SPEC = ft.Spec()


@pytest.fixture(scope="module")
def straight():
    return ft.run_straight(SPEC)


def test_killed_mid_step_mid_write_and_before_rename_resumes_bit_for_bit(straight, tmp_path):
    late = random.Random(15).randrange(17, SPEC.steps)  # and once more at a step drawn at random after those
    out = ft.run_with_kills(tmp_path, SPEC, ["step@5", "write@12", "rename@16", f"step@{late}"])
    codes = [a["returncode"] for a in out["attempts"]]
    assert codes == [-9, -9, -9, -9, 0], out["attempts"]
    # where each attempt started: fresh; the checkpoint of step 4; 8 (12's write was killed); 12 (16's rename);
    # then the newest checkpoint before the random kill
    assert [a["resumed_from"] for a in out["attempts"]] == [None, 4, 8, 12, late // SPEC.every * SPEC.every]
    after_write, after_rename = out["attempts"][1]["files"], out["attempts"][2]["files"]
    assert "step-00000012.ckpt" not in after_write and any(f.startswith(".step-00000012.ckpt.tmp-") for f in after_write)
    assert "step-00000016.ckpt" not in after_rename and any(f.startswith(".step-00000016.ckpt.tmp-") for f in after_rename)
    assert not any(".tmp-" in f for f in out["attempts"][-1]["files"])  # the resume removed the stale temp files
    assert ft.same_run(out, straight)  # losses (train and validation) equal, every parameter torch.equal


def _small(seed=0, n_embd=16):
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=n_embd, dropout=0.1))
    gen = torch.Generator().manual_seed(seed + 1)
    batch = lambda split: (lambda x: (x[:, :-1], x[:, 1:]))(torch.randint(0, 20, (4, 9), generator=gen))  # noqa: E731
    return model, batch, gen, TrainConfig(max_steps=12, warmup_steps=2, eval_interval=4, eval_iters=1, progress=False)


def _run(directory=None, every=4, keep=3, resume=False, **kw):
    model, batch, gen, cfg = _small(**kw)
    ckpt = ck.Checkpointer(directory, every=every, keep=keep, data=gen) if directory else None
    hist = train(model, batch, cfg, hooks=[ckpt] if ckpt else [], resume=ckpt.resume if resume else None)
    return model, hist, ckpt


def test_a_damaged_newest_checkpoint_is_refused_and_the_previous_one_resumes_exactly(tmp_path):
    model, hist, _ = _run()
    _run(tmp_path)
    names = [p.name for _, p in ck.list_checkpoints(tmp_path)]
    assert names == ["step-00000004.ckpt", "step-00000008.ckpt", "step-00000012.ckpt"]
    newest, middle = tmp_path / names[2], tmp_path / names[1]
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated, as by a torn copy
    with pytest.raises(ck.CheckpointError, match="truncated: the header promises"):
        ck.read(newest)
    blob = bytearray(middle.read_bytes())
    blob[len(blob) // 2] ^= 0x10  # one flipped bit in the payload
    middle.write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match="corrupted: the SHA-256"):
        ck.read(middle)
    with pytest.warns(UserWarning) as seen:
        assert ck.latest_valid(tmp_path) == tmp_path / names[0]
    assert [str(newest) in str(w.message) for w in seen] == [True, False]  # both named, newest first
    assert str(middle) in str(seen[1].message)
    with pytest.warns(UserWarning):
        resumed, rhist, ckpt = _run(tmp_path, resume=True, seed=5)  # other weights and data seed: all restored
    assert ckpt.resumed_from == tmp_path / names[0]
    assert rhist.train_loss == hist.train_loss and rhist.val_loss == hist.val_loss
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))
    (tmp_path / "step-00000099.ckpt").write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(ck.CheckpointError, match="is not a course checkpoint"):
        ck.read(tmp_path / "step-00000099.ckpt")


def test_keeps_the_last_k_and_never_leaves_a_partial_file_under_a_final_name(tmp_path, monkeypatch):
    _, _, ckpt = _run(tmp_path, every=2, keep=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [10, 12]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model, _, _, _ = _small()

    def interrupted(f, blob):  # stops like a kill: half the bytes written, no clean-up runs
        f.write(blob[:len(blob) // 2])
        raise KeyboardInterrupt
    monkeypatch.setattr(ck, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ck.save(tmp_path / "step-00000014.ckpt", model, step=14)
    assert not (tmp_path / "step-00000014.ckpt").exists()
    assert [p.name for p in tmp_path.glob(".step-00000014.ckpt.tmp-*")]  # the half-written file has a temp name
    assert ck.latest_valid(tmp_path).name == "step-00000012.ckpt"
    assert all((tmp_path / n).read_bytes() == b for n, b in before.items())


def test_a_full_or_unwritable_directory_fails_clearly_and_loses_nothing(tmp_path, monkeypatch):
    _run(tmp_path, every=4)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model, _, _, _ = _small()

    def full(f, blob):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(ck, "_write", full)
    with pytest.raises(OSError, match="No space left on device.*earlier checkpoints in .* are intact") as e:
        ck.save(tmp_path / "step-00000016.ckpt", model, step=16)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    if os.geteuid() == 0:  # root ignores directory permissions: refuse the open as the kernel would
        def refused(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(ck, "open", refused, raising=False)
    else:
        tmp_path.chmod(0o500)
    try:
        with pytest.raises(OSError, match="Permission denied.*intact"):
            ck.save(tmp_path / "step-00000016.ckpt", model, step=16)
    finally:
        tmp_path.chmod(0o700)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_another_model_shape_is_refused_naming_the_parameter_and_both_shapes(tmp_path):
    _run(tmp_path)
    other, _, _, cfg = _small(n_embd=24)
    with pytest.raises(ck.CheckpointError, match=r"parameter 'wte.weight' is \(20, 16\) there and \(20, 24\) in"):
        ck.load(ck.latest_valid(tmp_path), other, make_optimizer(other, cfg))
    with pytest.raises(ck.CheckpointError, match="another model shape"):  # through train's resume as well
        train(other, lambda s: None, cfg, resume=ck.Checkpointer(tmp_path).resume)


def test_every_global_generator_is_restored(tmp_path):
    model, _, _, _ = _small()
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    ck.save(tmp_path / "a.ckpt", model)
    want = (torch.rand(3), random.random(), np.random.rand(), random.gauss(0, 1))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    ck.load(tmp_path / "a.ckpt", model)
    assert (torch.rand(3), random.random(), np.random.rand(), random.gauss(0, 1))[1:] == want[1:]


@pytest.mark.parametrize("call, match", [
    (lambda d, m: ck.Checkpointer(d, every=0), "every must be an integer >= 1, got 0"),
    (lambda d, m: ck.Checkpointer(d, keep=True), "keep must be an integer >= 1, got True"),
    (lambda d, m: ck.Checkpointer(d, data=[1, 2]), r"data\['data'\] must be a torch.Generator"),
    (lambda d, m: ck.save(d / "x.ckpt", m, step=-1), "step must be an integer >= 0, got -1"),
    (lambda d, m: ck.save(d / "nowhere" / "x.ckpt", m), "does not exist"),
    (lambda d, m: ck.save(d / "x.ckpt", "weights"), "model must be a torch.nn.Module"),
    (lambda d, m: ck.read(d / "missing.ckpt"), "no checkpoint file at"),
    (lambda d, m: ft.parse_kill("boom@3"), "kind in"),
    (lambda d, m: ft.Spec(steps=10, every=4), "multiple of every"),
])
def test_bad_inputs(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path, _small()[0])


def test_loading_what_was_not_saved_is_refused(tmp_path):
    model, _, gen, cfg = _small()
    ck.save(tmp_path / "a.ckpt", model)
    with pytest.raises(ck.CheckpointError, match="holds no optimizer state"):
        ck.load(tmp_path / "a.ckpt", model, make_optimizer(model, cfg))
    with pytest.raises(ck.CheckpointError, match="no data position named 'data'"):
        ck.load(tmp_path / "a.ckpt", model, data=gen)
    assert ck.latest_valid(tmp_path / "empty") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.Checkpointer(tmp_path / "fresh").resume(model, None) is None  # nothing to resume: start fresh
