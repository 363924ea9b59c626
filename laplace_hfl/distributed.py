"""Data-parallel HFL on ``torch.distributed`` (any backend: gloo, NCCL).

When a default process group with more than one process is initialised
(``torchrun``, ``torch.multiprocessing``), every rank calls ``fit`` with its own
shard of the training data (a ``DistributedSampler`` loader, as in DDP
training, or any per-rank subset) and the same calls afterwards. Every sum over
training data -- the objective, its gradient, the GGN- and Hessian-vector
products inside the batched CG, the Nyström sketch, the amortised right-hand
sides -- is computed on the local shard and combined by :class:`AllReduce`,
once per data pass (one collective per CG iteration for a whole chunk of
directions). All data-dependent control flow (CG stopping, Newton steps) reads
only all-reduced values, so every rank takes the same path and returns the same
result.

What this module guarantees beside the sums:

* ``DistributedSampler`` padding (the examples it repeats so that shards have
  equal length) is dropped, so each example counts once; ``drop_last=True``
  (which leaves examples out) is refused. ``n_data`` and the loss are global.
* Empty and uneven shards are fine.
* Failures at phase boundaries (a rank whose checked fit pass raises, different
  MAPs, mismatched query inputs) raise on *every* rank, right away. A rank that
  fails inside a data pass leaves the others waiting in the collective: they get
  the process group's own error when its connection closes or its timeout
  (``init_process_group(timeout=...)``) expires.
* Amortised right-hand sides draw the noise of example ``n`` from a generator
  keyed by ``n``'s global index (:mod:`laplace_hfl.engine.example_noise`), so the samples equal
  those of one process on the full data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "HFLDistributedError",
    "CollectiveStats",
    "STATS",
    "AllReduce",
    "world",
    "is_distributed",
    "data_reducer",
    "unwrap_model",
    "check_same",
    "collective",
    "collective_device",
    "fingerprint",
    "tensors_of",
    "DistributedMixin",
]


class HFLDistributedError(RuntimeError):
    """Another rank failed, or the ranks disagree (MAP, query inputs)."""


@dataclass
class CollectiveStats:
    """Count and wall time of :class:`AllReduce` calls (for benchmarks)."""

    calls: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def reset(self) -> None:
        self.calls, self.seconds, self.bytes = 0, 0.0, 0


#: Process-wide statistics of the data-term collectives.
STATS = CollectiveStats()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a default process group with more than one process exists."""
    return world()[1] > 1


def collective_device(like: Tensor | None = None) -> torch.device:
    """Where small control tensors must live for the default backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like is None else like.device


def collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a backend failure becomes :class:`HFLDistributedError`."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as err:  # DistBackendError: timeout, closed peer
        raise HFLDistributedError(
            "A collective of HFL failed: another rank failed or stopped calling "
            "(its own error says why); every rank must make the same HFL calls. "
            "Backend error: " + str(err)
        ) from err


class AllReduce:
    """``reduce`` hook of :class:`~laplace_hfl.engine.functional.LaplaceObjective`:
    sums a data term over all ranks (``all_reduce(SUM)``), in place.

    Raises
    ------
    HFLDistributedError
        The collective failed (a peer closed its connection, or the process
        group's timeout expired while a rank was missing).
    """

    def __call__(self, total: Tensor) -> Tensor:
        buf = total.contiguous()
        start = time.perf_counter()
        collective(dist.all_reduce, buf, op=dist.ReduceOp.SUM)
        if buf.is_cuda:
            torch.cuda.synchronize(buf.device)
        STATS.calls += 1
        STATS.seconds += time.perf_counter() - start
        STATS.bytes += buf.numel() * buf.element_size()
        return buf


def data_reducer() -> AllReduce | None:
    """The ``reduce`` hook for the current process group (None on one process)."""
    return AllReduce() if is_distributed() else None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``."""
    if isinstance(
        model, nn.parallel.DistributedDataParallel | nn.parallel.DataParallel
    ):
        return model.module
    return model


# ------------------------------------------------------- rank consistency
def fingerprint(tensors: list[Tensor]) -> list[float]:
    """A fixed-length summary that differs for (almost) any difference."""
    numel, shape_hash, total, square, weighted, nans = 0, 0, 0.0, 0.0, 0.0, 0
    for t in tensors:
        f = t.detach().flatten().to(device="cpu", dtype=torch.float64)
        nans += int(torch.isnan(f).sum())
        f = torch.nan_to_num(f, nan=0.0, posinf=1e300, neginf=-1e300)
        w = (torch.arange(f.numel(), dtype=torch.float64) * 0.6180339887).frac()
        numel += f.numel()
        shape_hash = hash((shape_hash, tuple(t.shape))) % 2**50
        total += float(f.sum())
        square += float(f.square().sum())
        weighted += float((w * f).sum())
    return [len(tensors), numel, shape_hash, total, square, weighted, nans]


def tensors_of(x: Any) -> list[Tensor]:
    """The tensors in ``x`` (a tensor, a mapping or a sequence of them)."""
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, MutableMapping):
        return [x[k] for k in sorted(x, key=str) if isinstance(x[k], Tensor)]
    if isinstance(x, tuple | list):
        return [t for v in x for t in tensors_of(v)]
    return []


def check_same(x: Any, what: str) -> None:
    """Raise on every rank unless ``x`` (tensors, dicts of them) is identical
    on all ranks: one all-reduce of a 7-number fingerprint (and its negation).

    Raises
    ------
    HFLDistributedError
        The ranks passed different ``x``.
    """
    if not is_distributed():
        return
    tensors = tensors_of(x)
    f = torch.tensor(fingerprint(tensors), dtype=torch.float64)
    buf = torch.cat([f, -f]).to(collective_device(tensors[0] if tensors else None))
    collective(dist.all_reduce, buf, op=dist.ReduceOp.MAX)
    hi, lo = buf[: f.numel()], -buf[f.numel() :]
    if not bool(torch.equal(hi, lo)):
        raise HFLDistributedError(
            f"The ranks passed different {what}. HFL predictions are collective: "
            "call them on every rank with identical inputs (e.g. broadcast them "
            "from rank 0), or use amortize=..., whose predictions are local."
        )


# ---------------------------------------------------------------------- shell
class DistributedMixin:
    """Checks that collective predictions get identical inputs on every rank.

    Placed before :class:`~laplace_hfl.prediction.PredictionMixin`. Amortised
    predictions involve no collective and may differ per rank.
    """

    def _glm_predictive_distribution(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        if self.amortize is None or self._amortized_stale():
            check_same(X, "query inputs")
        return super()._glm_predictive_distribution(X, joint, diagonal_output)

    def _solve_jacobians(self, Js: Tensor) -> tuple[Tensor, Tensor]:
        if self.amortize is None or self._amortized_stale():
            check_same(Js, "Jacobians")
        return super()._solve_jacobians(Js)

    def state_dict(self) -> dict[str, Any]:
        """As on one process, but never a shard's cached training batches.

        A state saved in a distributed job (e.g. on rank 0) holds the global
        ``n_data`` and loss and the amortised samples, which load and predict
        on one process; a last-layer state drops its cached features (they
        are this rank's shard only), so exact predictions after loading need
        ``fit`` again, as for all-weights HFL.
        """
        state = super().state_dict()
        if is_distributed():
            state["training_X"] = state["training_y"] = None
        return state

    def _amortized_stale(self) -> bool:
        """Whether the next amortised prediction redraws samples (collective)."""
        return not self._solver().is_current(self._solve_context())
