"""Peak memory: the one meter of the evaluation and the benchmarks.

:class:`PeakMemory` measures a block within a process (the comparison's
``MiB`` column, the real-network rows); :func:`reset_peak` / :func:`rss_mb` /
:func:`device_peak_mb` read the process's resident-set peak (``VmHWM``,
resettable through ``/proc/self/clear_refs`` on Linux) and the CUDA
allocator's peak; :func:`peak_rss_mb` is the peak of a whole (fresh) process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import threading
import tracemalloc
from typing import Any

import torch

__all__ = [
    "PeakMemory",
    "cuda_in_use",
    "rss_mb",
    "reset_peak",
    "device_peak_mb",
    "peak_rss_mb",
]


class PeakMemory:
    """Context manager measuring the peak memory the enclosed block allocates, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` above the value at entry. On
    CPU with glibc: peak bytes *in use* on the C heap (``mallinfo2``: small
    blocks plus mmapped blocks, which is where PyTorch's CPU tensors live)
    above the value at entry, sampled every millisecond by a background
    thread. Unlike the resident set size this sees memory freed and reused
    within a process, so it is comparable between methods run one after the
    other; blocks alive for under a millisecond can be missed. Elsewhere:
    ``tracemalloc`` (Python allocations only).

    Attributes
    ----------
    peak_mb : float
        Peak in MiB (``nan`` before the block has run).
    mode : {"cuda", "heap", "tracemalloc"}
        What was measured.
    """

    def __init__(
        self, device: torch.device | str = "cpu", interval: float = 1e-3
    ) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = float("nan")
        self.mode = (
            "cuda"
            if self.device.type == "cuda"
            else ("heap" if _heap_in_use() is not None else "tracemalloc")
        )

    def __enter__(self) -> PeakMemory:
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.mode == "heap":
            self._base = self._peak = _heap_in_use()
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(self.interval):
                    self._peak = max(self._peak, _heap_in_use())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        else:
            tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mode == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.mode == "heap":
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _heap_in_use()) - self._base
        else:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self.peak_mb = max(peak, 0) / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks "
            "fordblks keepcost"
        ).split()
    ]


def _load_mallinfo2() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _heap_in_use() -> int | None:
    """Bytes in use on the C heap (glibc), ``None`` where unavailable."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return int(info.uordblks + info.hblkhd)


def cuda_in_use() -> bool:
    """Whether this process has initialised CUDA."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


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
    if cuda_in_use():
        torch.cuda.reset_peak_memory_stats()
    return rss_mb("VmRSS")


def device_peak_mb() -> float | None:
    """The CUDA allocator's peak since :func:`reset_peak` in MiB; None
    where CUDA was never used."""
    return torch.cuda.max_memory_allocated() / 2**20 if cuda_in_use() else None


def peak_rss_mb() -> float:
    """Peak resident set size of this process (VmHWM; ru_maxrss survives exec)."""
    peak = rss_mb("VmHWM")
    if peak == peak:  # not NaN: /proc is there
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
