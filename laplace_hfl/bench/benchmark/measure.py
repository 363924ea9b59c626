"""Device choice and wall-clock timing for the benchmarks.

Timings synchronise the device before the clock is read (CUDA kernels are
asynchronous). Peak memory: :mod:`laplace_hfl.bench.evaluation.memory`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from laplace_hfl.bench.evaluation.memory import cuda_in_use

__all__ = [
    "pick_device",
    "synchronize",
    "timed",
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


def synchronize() -> None:
    """Wait for queued CUDA kernels (no-op where CUDA was never used)."""
    if cuda_in_use():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """``(fn(), seconds)``, CUDA synchronised before both clock reads."""
    synchronize()
    t = time.perf_counter()
    out = fn()
    synchronize()
    return out, time.perf_counter() - t


def describe_device(device: torch.device | str) -> str:
    """``"cpu (N threads)"`` or the CUDA device's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
