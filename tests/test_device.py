import pytest
import torch

from course.device import PEAK_FLOPS, Profile, machine_info, peak_flops, pick_device, profile


def test_cpu_profile_is_small_and_fp32(monkeypatch):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    p = profile(device="cpu")
    assert isinstance(p, Profile) and p.name == "cpu" and p.dtype == torch.float32
    assert p.n_embd % p.n_head == 0
    assert "cpu" in repr(p)


def test_gpu_profile_is_larger():
    cpu, gpu = profile("cpu", device="cpu"), profile("gpu", device="cpu")
    assert gpu.n_embd > cpu.n_embd and gpu.block_size > cpu.block_size


def test_env_overrides_and_bad_values(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu")
    monkeypatch.setenv("COURSE_DEVICE", "tpu")
    with pytest.raises(ValueError, match="device"):
        pick_device()
    with pytest.raises(ValueError, match="profile"):
        profile("huge", device="cpu")


def test_peak_flops_table_is_used_by_name(monkeypatch):
    import course.device as d
    monkeypatch.setattr(d, "device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops("cuda") == PEAK_FLOPS["H200"]
    monkeypatch.setattr(d, "device_name", lambda device=None: "AMD EPYC")
    assert peak_flops("cpu") is None


def test_machine_info_has_what_benchmarks_record():
    info = machine_info()
    assert {"device", "device_name", "cores", "torch"} <= set(info)
    assert info["torch"] == torch.__version__


def test_smoke_profile_is_tiny_where_lessons_read_it(monkeypatch):
    """COURSE_PROFILE=smoke (the browser test's kernels) shrinks what the lessons size from the profile,
    and leaves a choice for every layer and head control."""
    from course.lessons.sam import Sizes
    from course.lessons.stability import Setup
    monkeypatch.setenv("COURSE_PROFILE", "smoke")
    smoke, cpu = profile(device="cpu"), profile("cpu", device="cpu")
    assert smoke.name == "smoke" and smoke.n_layer >= 2 and smoke.n_head >= 2
    assert smoke.max_steps * smoke.batch_size * smoke.block_size < cpu.max_steps * cpu.batch_size * cpu.block_size / 100
    assert Sizes.from_profile(smoke).steps < Sizes.from_profile(cpu).steps == Sizes().steps
    assert Setup.from_profile(smoke).steps < Setup.from_profile(cpu).steps == Setup().steps
    assert Setup.from_profile(profile("gpu", device="cpu")).n_embd > Setup().n_embd
