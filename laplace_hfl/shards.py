"""A rank's shard of the training data for data-parallel HFL.

:func:`fit_shard` runs the checked fit pass on this rank's batches
(:class:`ShardLoader`: ``DistributedSampler`` padding dropped, each example once
with its global index) and combines what must be global (``n_data``, the loss,
the MAP fingerprint) across ranks; see :mod:`laplace_hfl.distributed` for the
guarantees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from laplace_hfl.distributed import (
    HFLDistributedError,
    collective,
    fingerprint,
    is_distributed,
    world,
)
from laplace_hfl.engine.batches import batch_rows, merge_batches

__all__ = ["ShardLoader", "FitShard", "fit_shard"]


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
            n = batch_rows(data)
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
            "mean": fingerprint([mean]),
            "expected": None if shard.sampler is None else len(shard.sampler.dataset),
        }
    except Exception as err:  # reported to every rank below
        error = err
        summary = {"error": f"{type(err).__name__}: {err}"}
    summaries: list[dict[str, Any]] = [{}] * size
    collective(dist.all_gather_object, summaries, summary)
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
