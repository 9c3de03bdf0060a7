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
