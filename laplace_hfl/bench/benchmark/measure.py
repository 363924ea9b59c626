"""Device choice, wall-clock timing and peak memory for the benchmarks.

Timings synchronise the device before the clock is read (CUDA kernels are
asynchronous); peaks are the host's resident set (``VmHWM``, resettable
through ``/proc/self/clear_refs`` on Linux) and, on CUDA, the allocator's
peak (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = [
    "pick_device",
    "synchronize",
    "timed",
    "rss_mb",
    "reset_peak",
    "device_peak_mb",
    "describe_device",
]

T = TypeVar("T")


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU.

    Raises
    ------
    ValueError
        ``"cuda"`` asked for on a machine without one.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here; use --device cpu.")
    return device


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def synchronize() -> None:
    """Wait for queued CUDA kernels (no-op where CUDA was never used)."""
    if _cuda_in_use():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds)``, CUDA synchronised before both clock reads."""
    synchronize()
    t = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t


def rss_mb(field: str = "VmHWM") -> float:
    """Peak (``VmHWM``) or current (``VmRSS``) resident set in MiB; NaN off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def reset_peak() -> float:
    """Reset the host peak to the current resident set (Linux) and the CUDA
    allocator's peak; returns the current resident set in MiB."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    if _cuda_in_use():
        torch.cuda.reset_peak_memory_stats()
    return rss_mb("VmRSS")


def device_peak_mb() -> float | None:
    """The CUDA allocator's peak since :func:`reset_peak` in MiB; None
    where CUDA was never used."""
    return torch.cuda.max_memory_allocated() / 2**20 if _cuda_in_use() else None


def describe_device(device: torch.device | str) -> str:
    """``"cpu (N threads)"`` or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
