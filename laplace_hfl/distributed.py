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
  keyed by ``n``'s global index (:mod:`laplace_hfl.example_noise`), so the samples equal
  those of one process on the full data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from laplace_hfl.batches import merge_batches

__all__ = [
    "HFLDistributedError",
    "CollectiveStats",
    "STATS",
    "AllReduce",
    "ShardLoader",
    "FitShard",
    "world",
    "is_distributed",
    "data_reducer",
    "unwrap_model",
    "fit_shard",
    "check_same",
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


def _collective_device(like: Tensor | None = None) -> torch.device:
    """Where small control tensors must live for the default backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if like is None else like.device


def _collective(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
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
    """``reduce`` hook of :class:`~laplace_hfl.functional.LaplaceObjective`:
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
        _collective(dist.all_reduce, buf, op=dist.ReduceOp.SUM)
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


# --------------------------------------------------------------------- shards
def _batch_rows(data: Any) -> int:
    if isinstance(data, Tensor):
        return int(data.shape[0])
    if isinstance(data, MutableMapping):
        return int(next(v for v in data.values() if isinstance(v, Tensor)).shape[0])
    return _batch_rows(data[0])


def _take(data: Any, keep: Tensor, n: int) -> Any:
    if isinstance(data, Tensor):
        return data[keep] if data.ndim and data.shape[0] == n else data
    if isinstance(data, MutableMapping):
        return type(data)({k: _take(v, keep, n) for k, v in data.items()})
    if isinstance(data, tuple | list):
        return type(data)(_take(v, keep, n) for v in data)
    return data


class ShardLoader:
    """A rank's training batches, each example once, with its global index.

    Wraps the user's loader: ``DistributedSampler`` padding rows are dropped
    (a padding-only batch is skipped), and :attr:`indices` holds, per yielded
    batch of the last complete pass, the examples' indices -- dataset indices
    under a ``DistributedSampler``, positions in the local loader order
    otherwise (the shell adds the rank's offset).

    Parameters
    ----------
    loader : DataLoader
        The rank's loader.

    Raises
    ------
    ValueError
        A ``DistributedSampler`` with ``drop_last=True`` (examples left out) or
        one built for another rank or world size than the process group's.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.dataset = getattr(loader, "dataset", None)
        self.indices: list[Tensor] = []
        rank, size = world()
        sampler = getattr(loader, "sampler", None)
        self.sampler = sampler if isinstance(sampler, DistributedSampler) else None
        if self.sampler is not None:
            if self.sampler.drop_last:
                raise ValueError(
                    "DistributedSampler(drop_last=True) leaves examples out, so HFL "
                    "would not refit on the data the MAP was trained on; use "
                    "drop_last=False (HFL drops the padding it repeats)."
                )
            if (self.sampler.num_replicas, self.sampler.rank) != (size, rank):
                raise ValueError(
                    f"The DistributedSampler is for rank {self.sampler.rank} of "
                    f"{self.sampler.num_replicas}, but this process is rank {rank} "
                    f"of {size}; build it with the default process group."
                )

    def __iter__(self) -> Iterator[Any]:
        order = None
        if self.sampler is not None:
            order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
            n_total, step = len(self.sampler.dataset), self.sampler.num_replicas
        indices, pos = [], 0
        for data in self.loader:
            n = _batch_rows(data)
            k = torch.arange(pos, pos + n)
            pos += n
            if order is not None:
                keep = self.sampler.rank + k * step < n_total
                index = order[k[keep]]
                if not bool(keep.all()):
                    if not bool(keep.any()):
                        continue
                    data = _take(data, keep, n)
            else:
                index = k
            indices.append(index)
            yield data
        self.indices = indices


@dataclass(frozen=True)
class FitShard:
    """What the shell keeps from a (possibly distributed) checked fit pass.

    Attributes
    ----------
    loss : float
        Summed loss over all ranks.
    n_data : int
        Global number of training examples.
    n_outputs : int
    mean : Tensor
        The MAP (identical on every rank).
    cached : list or None
        This rank's refit batches (None: re-iterate :attr:`loader`).
    loader : ShardLoader
    index : list of Tensor
        Global example indices per refit batch (aligned with ``cached``, or
        with the batches of ``loader``).
    """

    loss: float
    n_data: int
    n_outputs: int
    mean: Tensor
    cached: list[tuple[Any, Tensor]] | None
    loader: ShardLoader
    index: list[Tensor]


def _fingerprint(tensors: list[Tensor]) -> list[float]:
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


def _tensors(x: Any) -> list[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, MutableMapping):
        return [x[k] for k in sorted(x, key=str) if isinstance(x[k], Tensor)]
    if isinstance(x, tuple | list):
        return [t for v in x for t in _tensors(v)]
    return []


def _merge_index(
    index: list[Tensor], cached: list[tuple[Any, Tensor]] | None, max_rows: int
) -> list[Tensor]:
    """Group the per-batch indices as ``merge_batches`` grouped the batches."""
    if cached is None or len(cached) == len(index):
        return index
    merged = merge_batches([(i, i) for i in index], max_rows)
    return [i for i, _ in merged]


def fit_shard(
    run: Callable[[Any], tuple[Tensor | None, float, Any, Tensor]],
    train_loader: DataLoader,
    max_rows: int,
) -> FitShard:
    """Run the shell's checked fit pass on this rank's shard and agree on totals.

    Parameters
    ----------
    run : callable
        ``run(loader) -> (first_out, loss, cached, mean)`` (the shell's
        ``_fit_pass``); ``first_out`` is None on an empty shard.
    train_loader : DataLoader
    max_rows : int
        ``refit_batch_size`` (how the cached batches were merged).

    Returns
    -------
    FitShard

    Raises
    ------
    HFLDistributedError
        On every rank but the failing one when a rank's pass raised (the failing
        rank re-raises its own error), when the MAPs differ across ranks, or
        when no rank holds data.
    ValueError
        ``DistributedSampler`` misuse (see :class:`ShardLoader`); a
        ``DistributedSampler`` loader whose batches miss examples
        (``DataLoader(drop_last=True)``).
    """
    if not is_distributed():
        shard = ShardLoader(train_loader)
        first_out, loss, cached, mean = run(shard)
        return FitShard(
            loss,
            len(train_loader.dataset),
            int(first_out.shape[-1]),
            mean,
            cached,
            shard,
            _merge_index(shard.indices, cached, max_rows),
        )
    rank, size = world()
    error: BaseException | None = None
    try:
        shard = ShardLoader(train_loader)
        first_out, loss, cached, mean = run(shard)
        n_rows = sum(int(i.numel()) for i in shard.indices)
        summary = {
            "loss": loss,
            "rows": n_rows,
            "outputs": None if first_out is None else int(first_out.shape[-1]),
            "mean": _fingerprint([mean]),
            "expected": None if shard.sampler is None else len(shard.sampler.dataset),
        }
    except Exception as err:  # reported to every rank below
        error = err
        summary = {"error": f"{type(err).__name__}: {err}"}
    summaries: list[dict[str, Any]] = [{}] * size
    _collective(dist.all_gather_object, summaries, summary)
    failed = [(r, s["error"]) for r, s in enumerate(summaries) if "error" in s]
    if failed:
        if error is not None:
            raise error
        raise HFLDistributedError(
            "fit failed on another rank: "
            + "; ".join(f"rank {r}: {msg}" for r, msg in failed)
        )
    if any(s["mean"] != summaries[0]["mean"] for s in summaries):
        raise HFLDistributedError(
            "The ranks hold different MAP parameters; fit the same trained model "
            "on every rank (DDP keeps them in sync; load the same checkpoint)."
        )
    outputs = {s["outputs"] for s in summaries} - {None}
    if len(outputs) != 1:
        raise HFLDistributedError(
            "No rank holds training data."
            if not outputs
            else f"The ranks' models have different output sizes {sorted(outputs)}."
        )
    rows = [s["rows"] for s in summaries]
    n_data = sum(rows)
    expected = summaries[0]["expected"]
    if expected is not None and n_data != expected:
        raise ValueError(
            f"The DistributedSampler shards hold {n_data} distinct examples but "
            f"the dataset has {expected}: do not drop the last batch "
            "(DataLoader(drop_last=False))."
        )
    index = shard.indices
    if shard.sampler is None:  # positions in rank order, as one process would
        offset = sum(rows[:rank])
        index = [i + offset for i in index]
    return FitShard(
        float(sum(s["loss"] for s in summaries)),
        n_data,
        outputs.pop(),
        mean,
        cached,
        shard,
        _merge_index(index, cached, max_rows),
    )


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
    tensors = _tensors(x)
    f = torch.tensor(_fingerprint(tensors), dtype=torch.float64)
    buf = torch.cat([f, -f]).to(_collective_device(tensors[0] if tensors else None))
    _collective(dist.all_reduce, buf, op=dist.ReduceOp.MAX)
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
        key = self._hyper_key() + (int(self.amortize),)
        return self._amortized is None or self._amortized_key != key
