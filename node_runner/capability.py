"""What a node can do, measured with torch: matmul throughput, memory, device name and class."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import psutil
import torch


@dataclass(frozen=True)
class Capability:
    """The measured claim a node registers with (and signs)."""

    device: str
    """``cuda`` or ``cpu``: where the workloads run."""
    device_name: str
    device_class: str
    """Hardware class for homogeneous redundancy, e.g. ``cuda-sm90`` or ``cpu-x86_64``."""
    tflops_milli: int
    memory_mb: int


def pick_device(force_cpu: bool = False) -> torch.device:
    """CUDA when present (and not refused), else the CPU."""
    if not force_cpu and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def matmul_tflops(device: torch.device, size: int | None = None, repeats: int = 3) -> float:
    """float32 matmul throughput in TFLOP/s: the best of ``repeats`` timed products."""
    n = size or (4096 if device.type == "cuda" else 768)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.rand((n, n), generator=gen).to(device)
    b = torch.rand((n, n), generator=gen).to(device)
    torch.matmul(a, b)  # warm-up: kernels, allocator, caches
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e12


def measure(device: torch.device) -> Capability:
    """Benchmark ``device`` and describe it."""
    tflops = matmul_tflops(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return Capability("cuda", props.name, f"cuda-sm{props.major}{props.minor}",
                          max(1, round(tflops * 1000)), props.total_memory // 2**20)
    machine = platform.machine() or "unknown"
    name = f"cpu {platform.processor() or machine} x{os.cpu_count() or 1}"
    return Capability("cpu", name, f"cpu-{machine}", max(1, round(tflops * 1000)),
                      psutil.virtual_memory().total // 2**20)
