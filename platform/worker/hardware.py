"""The device a worker trains on, its autocast dtype and its peak FLOP/s (for MFU)."""

from __future__ import annotations

import re
import resource
import time
from pathlib import Path

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


def training_device(assigned: torch.device) -> torch.device:
    """The device Ray Train assigned this worker (`ray.train.torch.get_device()`: the GPU
    Ray gave it, counted among the node's GPUs it can see), made current so that NCCL
    and CUDA's allocator use it; the CPU when there is no GPU."""
    if assigned.type == "cuda":
        torch.cuda.set_device(assigned)
    return assigned


def limit_compile_workers(cpus: int) -> None:
    """Inductor compiles in a pool as large as the machine's cores; a worker owns only
    `cpus` of them, and every worker of the node compiles at once."""
    import torch._inductor.config as inductor  # only for compiled runs: it is slow to import

    inductor.compile_threads = max(1, cpus)


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


def memory_peaks(device: torch.device) -> dict[str, float]:
    """The most memory held since the last call (a logging window; the first call: since
    the process started), in GB, and the count starts again, so that a peak belongs to
    the steps it is logged with. `peak`: what CUDA's allocator handed out on a GPU, the
    process's peak resident set on the CPU (Python's runtime included); `reserved` (GPU
    only): what the allocator held from the driver, fragmentation included, which is
    what runs out."""
    if device.type == "cuda":
        peaks = {"peak": torch.cuda.max_memory_allocated(device) / 1e9,
                 "reserved": torch.cuda.max_memory_reserved(device) / 1e9}
        torch.cuda.reset_peak_memory_stats(device)
        return peaks
    return {"peak": peak_resident_gb()}


def peak_resident_gb() -> float:
    """The process's peak resident set (VmHWM) since the last call: Linux resets it when
    `5` is written to /proc/self/clear_refs. Elsewhere the peak since the start."""
    try:
        status = Path("/proc/self/status").read_text()
        peak_kib = int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE).group(1))
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak_kib * 1024 / 1e9
