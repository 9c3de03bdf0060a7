"""One place that decides where the course runs: device, dtype and a size profile.

Notebooks call `profile()` once and read every size from it, so the same lesson runs for a
couple of minutes on a laptop CPU and scales up on a GPU without editing a cell.
Override with the environment: COURSE_DEVICE=cpu|cuda|mps, COURSE_PROFILE=cpu|gpu|smoke.
`smoke` is for tests that need a lesson's code to run, not its results (the browser test's
explorers): every size a lesson reads from the profile is tiny, so what it learns means nothing.

MFU needs the accelerator's peak: `course.costs.PEAK_FLOPS` lists dense (no sparsity) bf16
tensor-core peaks from the vendor data sheets; CPU peaks are unknown, so MFU is None there.
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass, field

import torch

from .costs import PEAK_FLOPS

def pick_device(prefer: str | None = None) -> torch.device:
    """cuda if present, else mps, else cpu; `prefer` or $COURSE_DEVICE overrides."""
    choice = prefer or os.environ.get("COURSE_DEVICE")
    if choice:
        if choice not in ("cpu", "cuda", "mps"):
            raise ValueError(f"device must be one of 'cpu', 'cuda', 'mps', got {choice!r}")
        return torch.device(choice)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else pick_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    return cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak of a known GPU, matched by name; None when unknown (CPU, MPS)."""
    name = device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


@dataclass(frozen=True)
class Profile:
    """Sizes a lesson uses. `cpu` finishes in minutes on 2 cores; `gpu` is the scaled-up run; `smoke`
    only runs the code (two layers and two heads, so a layer or head control still has a choice)."""

    name: str
    device: torch.device
    dtype: torch.dtype  # autocast dtype for training (fp32 on CPU)
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    max_steps: int
    seq_lens: tuple[int, ...] = field(default=(128, 256, 512, 1024))

    def __repr__(self) -> str:
        return (f"Profile({self.name!r} on {self.device}: {self.n_layer} layers x {self.n_embd} wide, "
                f"{self.n_head} heads, context {self.block_size}, batch {self.batch_size}, "
                f"{self.max_steps} steps, dtype {str(self.dtype).replace('torch.', '')})")


PROFILES = {
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16, max_steps=300,
                seq_lens=(128, 256, 512, 1024, 2048)),
    "gpu": dict(n_layer=8, n_head=8, n_embd=512, block_size=512, batch_size=64, max_steps=2000,
                seq_lens=(512, 1024, 2048, 4096, 8192, 16384)),
    "smoke": dict(n_layer=2, n_head=2, n_embd=32, block_size=64, batch_size=4, max_steps=20,
                  seq_lens=(32, 64, 128)),
}


def profile(name: str | None = None, device: torch.device | str | None = None) -> Profile:
    """The size profile for this machine: 'gpu' on CUDA, 'cpu' otherwise ($COURSE_PROFILE overrides)."""
    dev = torch.device(device) if device is not None else pick_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                         f"use device='cpu' or None to pick what is there")
    name = name or os.environ.get("COURSE_PROFILE") or ("gpu" if dev.type == "cuda" else "cpu")
    if name not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {name!r}")
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return Profile(name=name, device=dev, dtype=dtype, **PROFILES[name])


def machine_info() -> dict:
    """What a benchmark records about where it ran."""
    dev = pick_device()
    info = {
        "device": dev.type,
        "device_name": device_name(dev),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if dev.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu_count"] = torch.cuda.device_count()
    return info


@contextlib.contextmanager
def cpu_threads(n: int = 1):
    """Run the block with torch.set_num_threads(n), then restore. For tiny models on a shared CPU: two
    OpenMP threads spinning against other processes made a lesson's training 20x slower than one thread
    (4.7 s against 0.2 s a step here). Results match the lesson's own one-thread setting."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"cpu_threads: n must be an integer >= 1, got {n!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

