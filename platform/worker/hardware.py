"""The device a worker trains on, its autocast dtype and its peak FLOP/s (for MFU)."""

from __future__ import annotations

import resource
import time

import torch

from raytron.platform.config.schema import AUTO

# Dense bf16 peak FLOP/s by GPU name, from the vendors' data sheets (SXM parts).
GPU_PEAK_BF16 = {
    "B200": 2.25e15,
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}


def training_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """`train.precision` (`config/schema.PRECISIONS`): bf16 autocast on GPUs (or when
    asked for), full fp32 otherwise."""
    if precision == "bf16" or (precision == AUTO and device.type == "cuda"):
        return torch.bfloat16
    return None


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The configured peak, the data-sheet peak of a known GPU, or the matmul rate
    measured on an unknown one; None on a CPU, whose peak nothing states and whose
    measured rate moves with whatever else runs on its cores (MFU read 23% to 133% at the
    same step time): a CPU run reports tokens/s alone, unless `train.peak_flops` is set."""
    if configured:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for model, flops in GPU_PEAK_BF16.items():
        if model in name:
            return flops
    return measured_matmul_flops(device, torch.bfloat16)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048,
                          seconds: float = 1.0) -> float:
    """Best sustained rate of a square matmul: an honest 'peak' where no data sheet applies."""
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # no RNG draws: the run's
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)  # random stream stays intact
    a @ b  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held: what CUDA's allocator handed out on a GPU,
    the process's peak resident set on the CPU (which includes the Python runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
