"""Free memory of a device: what the dense solver may use.

No dependency beyond the standard library and torch: ``/proc/meminfo``
(``MemAvailable``) or ``os.sysconf`` on the CPU, ``torch.cuda.mem_get_info``
on CUDA devices.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_bytes", "total_bytes"]


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can be allocated on ``device`` now, or ``None`` if unknown.

    Parameters
    ----------
    device : torch.device or str, default="cpu"

    Returns
    -------
    int or None
        CPU: ``MemAvailable`` of ``/proc/meminfo`` (else the free pages that
        ``os.sysconf`` reports); CUDA: the free bytes of
        ``torch.cuda.mem_get_info``; other devices: ``None``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def total_bytes(device: torch.device | str = "cpu") -> int:
    """Total memory of ``device`` in bytes (CUDA: the device's; otherwise the
    machine's physical memory by ``os.sysconf``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
