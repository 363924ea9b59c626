"""Per-example noise for the amortised right-hand sides, keyed by global index.

The amortised right-hand side ``b_s = sqrt(h) sum_n J_n^T Lambda_n^{1/2} xi_{s,n} + ...``
must not depend on how the training data is batched or sharded across
processes. :func:`example_noise` draws ``xi_{s,n}`` from a generator keyed by
the example's global index ``n``, so any rank, batch or position that holds
example ``n`` draws the same numbers (see :mod:`laplace_hfl.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from laplace_hfl.engine.batches import batch_rows

__all__ = ["NOISE_BLOCK", "example_noise", "batch_noise"]

#: Examples per noise block of :func:`example_noise`.
NOISE_BLOCK = 256


def _block_seed(key: int, block: int) -> int:
    return (key ^ (block * 0x9E3779B97F4A7C15)) % 2**63


def example_noise(key: int, index: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Standard normals ``(S, B, C)`` whose column ``b`` depends only on
    ``(key, index[b], S, C)``.

    Examples are grouped in blocks of :data:`NOISE_BLOCK` global indices; each
    block's ``(S, NOISE_BLOCK, C)`` normals come from a CPU generator seeded by
    ``(key, block)``. So the noise of an example is the same whichever rank,
    batch or position holds it. Costs at most ``S * NOISE_BLOCK * C`` draws per
    block a batch touches (contiguous shards touch few blocks).

    Parameters
    ----------
    key : int
        Drawn from the sampler's seeded generator (one per right-hand-side chunk).
    index : Tensor
        Global example indices ``(B,)`` of the batch.
    shape : tuple of int
        ``(S, B, C)``.

    Returns
    -------
    Tensor
        ``(S, B, C)`` float64 on the CPU.

    Raises
    ------
    RuntimeError
        ``index`` does not have ``B`` entries (the loader changed its batches).
    """
    S, B, *rest = shape
    if index.numel() != B:
        raise RuntimeError(
            f"Training batch of {B} rows but {index.numel()} recorded indices; "
            "the training loader must yield the same batches on every pass."
        )
    out = torch.empty(S, B, *rest, dtype=torch.float64)
    blocks = torch.div(index, NOISE_BLOCK, rounding_mode="floor")
    for block in torch.unique(blocks).tolist():
        g = torch.Generator(device="cpu").manual_seed(_block_seed(key, block))
        z = torch.randn(S, NOISE_BLOCK, *rest, generator=g, dtype=torch.float64)
        sel = blocks == block
        out[:, sel] = z[:, index[sel] % NOISE_BLOCK]
    return out


def batch_noise(
    index: list[Tensor] | None, batches: list[tuple[Any, Tensor]] | None
) -> Callable[[int, int, tuple[int, ...]], Tensor]:
    """The ``noise`` argument of :func:`~laplace_hfl.engine.amortized.perturbed_rhs`
    for refit batches with global indices ``index`` (positions in ``batches``
    when None, e.g. after ``load_state_dict``)."""
    if index is None:
        sizes = [batch_rows(X) for X, _ in batches or []]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        index = [torch.arange(s, s + n) for s, n in zip(starts, sizes)]

    def noise(key: int, k: int, shape: tuple[int, ...]) -> Tensor:
        return example_noise(key, index[k], shape)

    return noise
