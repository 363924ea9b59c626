"""How many directions one vectorised product holds: the memory model behind
``chunk_size="auto"``.

The bytes one direction costs are measured once per fit:

* on CUDA by a probe: the peak allocation (``torch.cuda.max_memory_allocated``)
  of one GGN product over the first training batch at two small chunk sizes;
  the slope, plus the float64 CG vectors each direction carries, is the cost
  of a direction;
* elsewhere by a model: :data:`PARAMETER_VECTORS` float64 parameter vectors
  (measured, ``scripts/memory_per_direction.py``) plus
  :data:`ACTIVATION_COPIES` times the bytes one forward pass of the first
  training batch produces (counted by a dispatch mode, no product run).

The chunk is then the most directions that fit :data:`MEMORY_FRACTION` of the
device's free memory (:func:`laplace_hfl.engine.device_memory.available_bytes`),
at most :data:`MAX_CHUNK` on CUDA. Elsewhere (the CPU) a larger chunk is no
faster: it is at most :data:`CPU_CHUNK` directions and :data:`CPU_CHUNK_BYTES`
(a LeNet GGN product over 1,000 images took 0.42-0.44 s per direction at 4-16
directions, 1.5 GB, and 0.78-1.0 s at 32-64, 3-6 GB; the estimator's sketch
0.76x and its refits 1.02x the time of 64 at 13: ``scripts/chunk_size_choice.py``,
``docs/cost.md``): the bound saves memory at no measured cost. Small models
keep 64. How the directions are grouped does not change the refit solutions
beyond rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from laplace_hfl.engine.device_memory import available_bytes
from laplace_hfl.engine.functional import LaplaceObjective, ggn_matvec

__all__ = [
    "CPU_CHUNK",
    "CPU_CHUNK_BYTES",
    "MAX_CHUNK",
    "MEMORY_FRACTION",
    "ChunkChoice",
    "forward_bytes",
    "probe_bytes_per_direction",
    "model_bytes_per_direction",
    "chunk_for_memory",
    "choose_chunk",
]

#: Directions per product on devices other than CUDA (the former fixed
#: ``chunk_size``): larger chunks are no faster on the CPU.
CPU_CHUNK = 64
#: Most modelled bytes of one chunk on the CPU (see the module text).
CPU_CHUNK_BYTES = 1.5 * 2**30
#: Most directions per product on CUDA.
MAX_CHUNK = 4096
#: Share of the free memory one chunk may take.
MEMORY_FRACTION = 0.5
#: Float64 parameter vectors one refit direction holds besides the
#: activations (peak RSS slope of ``scripts/memory_per_direction.py``, an MLP
#: with 100k parameters: 68).
PARAMETER_VECTORS = 68
#: Copies of all tensors one forward pass of a batch produces that one
#: direction holds (the JVP's tangents and the VJP's residuals). LeNet,
#: 1,000-image float64 batch: the forward produces 92 MB; one direction of a
#: GGN product measured 96 MB of peak RSS, modelled 115 MB
#: (``scripts/chunk_size_choice.py``).
ACTIVATION_COPIES = 1.0
#: Float64 CG vectors per direction beside the product (iterate, residual,
#: search direction, preconditioned residual, product, query row, answer).
_CG_VECTORS = 8
_PROBE_CHUNKS = (2, 4)


@dataclass(frozen=True)
class ChunkChoice:
    """What ``chunk_size="auto"`` chose.

    Attributes
    ----------
    chunk_size : int
    bytes_per_direction : float
    available : int or None
        Free bytes of the device when chosen (None: unknown).
    reason : str
        One sentence for ``la.last_diagnostics.choice``.
    """

    chunk_size: int
    bytes_per_direction: float
    available: int | None
    reason: str


class _Produced(TorchDispatchMode):
    """Counts the bytes of every tensor the dispatched operations produce."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def forward_bytes(
    forward: Callable[[Tensor, Any], Tensor], theta: Tensor, X: Any
) -> int:
    """Bytes of all tensors one forward pass ``forward(theta, X)`` produces
    (an upper bound on the activations it keeps)."""
    counter = _Produced()
    with torch.no_grad(), counter:
        forward(theta, X)
    return counter.bytes


def model_bytes_per_direction(n_params: int, activation_bytes: int) -> float:
    """Modelled bytes one refit direction holds: :data:`PARAMETER_VECTORS`
    float64 parameter vectors and :data:`ACTIVATION_COPIES` forward passes."""
    return PARAMETER_VECTORS * n_params * 8 + ACTIVATION_COPIES * activation_bytes


def probe_bytes_per_direction(
    product: Callable[[Tensor], Tensor], n_params: int, like: Tensor
) -> float:
    """Measured bytes per direction of ``product`` on a CUDA device: the slope
    of its peak allocation between :data:`_PROBE_CHUNKS` directions, plus the
    float64 CG vectors of a direction."""
    device = like.device
    peaks = []
    for k in _PROBE_CHUNKS:
        W = torch.randn(k, n_params, dtype=like.dtype, device=device)
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        product(W)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del W
    a, b = _PROBE_CHUNKS
    slope = max(peaks[1] - peaks[0], 0) / (b - a)
    return slope + _CG_VECTORS * n_params * 8


def chunk_for_memory(
    bytes_per_direction: float, available: int | None, cap: int
) -> int:
    """Most directions (1 to ``cap``) whose ``bytes_per_direction`` fit
    :data:`MEMORY_FRACTION` of ``available`` bytes (``cap`` if unknown)."""
    if available is None or bytes_per_direction <= 0:
        return cap
    return int(max(1, min(cap, MEMORY_FRACTION * available // bytes_per_direction)))


def choose_chunk(obj: LaplaceObjective) -> ChunkChoice:
    """Directions per vectorised product for the refits of ``obj`` on its
    device (one probe of the first training batch; see the module text).

    Parameters
    ----------
    obj : LaplaceObjective

    Returns
    -------
    ChunkChoice
    """
    theta = obj.theta_map
    P, device = theta.numel(), theta.device
    first = next(iter(obj.batches()), None)
    if first is None:  # an empty shard of a distributed fit
        return ChunkChoice(CPU_CHUNK, 0.0, None, "chunk_size auto: 64 (no data here)")
    one = dataclasses.replace(obj, batches=lambda: iter([first]), reduce=None)
    mb = 2**20
    if device.type == "cuda":
        per = probe_bytes_per_direction(lambda W: ggn_matvec(one, W), P, theta)
        how, cap = "measured by a probe of one batch", MAX_CHUNK
    else:
        per = model_bytes_per_direction(P, forward_bytes(obj.forward, theta, first[0]))
        how = "modelled"
        cap = int(max(1, min(CPU_CHUNK, CPU_CHUNK_BYTES // per)))
    free = available_bytes(device)
    chunk = chunk_for_memory(per, free, cap)
    limit = "memory-bound" if chunk < cap else "at most"
    if chunk == cap < CPU_CHUNK and device.type != "cuda":
        limit = f"at most {CPU_CHUNK_BYTES / 2**30:g} GB per chunk on the CPU"
    free_txt = "unknown" if free is None else f"{free / mb:,.0f} MB"
    reason = (
        f"chunk_size auto: {chunk} ({limit}; {per / mb:.3g} MB per direction "
        f"{how}, {free_txt} free, {MEMORY_FRACTION:g} of it usable)"
    )
    return ChunkChoice(chunk, per, free, reason)
