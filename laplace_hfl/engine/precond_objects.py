"""Preconditioner objects of the CG refit solves: none, Nyström, KFAC.

Every refit solve shares ``A = h C + diag(p_0)``. A preconditioner object has
two parts, as the curvature has:

:meth:`PreconditionerMethod.build`
    the data part (the Nyström sketch of the GGN, the KFAC factors), built
    once per fit: it does not depend on the prior precision, ``sigma_noise``
    or the temperature. Calling it again is free.
:meth:`PreconditionerMethod.apply`
    ``M^{-1}`` for the current ``h`` and prior precision, a
    :class:`~laplace_hfl.engine.preconditioner.Preconditioner` (``None``:
    no preconditioner).

:data:`PRECONDITIONERS` maps the ``preconditioner`` option's names to the
classes, in the order ``"auto"`` probes them (the sketch first: it usually
needs the fewest iterations, which caps the others' probes);
:meth:`PreconditionerMethod.available` says where one applies. Adding a
preconditioner: one subclass, one entry.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from laplace_hfl.engine.functional import LaplaceObjective, ParamLayout
from laplace_hfl.engine.kfac import kfac_apply, kfac_factors, kfac_supported
from laplace_hfl.engine.preconditioner import (
    NystromSketch,
    Preconditioner,
    SketchColumns,
    nystrom_apply,
    nystrom_columns,
    nystrom_sketch,
)

__all__ = [
    "PrecondSetup",
    "PreconditionerMethod",
    "NoPreconditioner",
    "NystromPreconditioner",
    "KFACPreconditioner",
    "PRECONDITIONERS",
]


@dataclass(frozen=True)
class PrecondSetup:
    """What building a preconditioner may read, supplied by the estimator.

    One per call: building reads only what it needs (KFAC the refit module,
    Nyström the rank and ``chunk_size``).

    Attributes
    ----------
    rank : int
        Rank of the Nyström sketch (``precondition_rank`` or its automatic
        value, at most ``P``).
    chunk_size : int
        Columns of the sketch formed per pass over the data.
    refit_module : callable
        Returns the refit module, its parameter layout and the fixed rest
        (KFAC reads the layers); called only by those that need it.
    """

    rank: int
    chunk_size: int
    refit_module: Callable[[], tuple[nn.Module, ParamLayout, Any]]


class PreconditionerMethod:
    """One way to precondition the refit solves (see module doc)."""

    #: The ``preconditioner`` option that selects it.
    name: ClassVar[str] = ""

    @classmethod
    def available(cls, setup: PrecondSetup) -> bool:
        """Whether it applies to this refit (``"auto"`` probes only those)."""
        return True

    def build(self, obj: LaplaceObjective, setup: PrecondSetup) -> None:
        """Form the data part (once per fit; again only if ``setup`` asks for
        a different one)."""

    def apply(self, h_factor: float, prior_precision: Tensor) -> Preconditioner | None:
        """``M^{-1}`` for these hyperparameters (after :meth:`build`)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class NoPreconditioner(PreconditionerMethod):
    """Plain CG."""

    name = "none"


class NystromPreconditioner(PreconditionerMethod):
    """Randomised Nyström sketch of the data GGN
    (:mod:`laplace_hfl.engine.preconditioner`)."""

    name = "nystrom"

    def __init__(self) -> None:
        self.sketch: NystromSketch | None = None
        self.rank: int | None = None
        #: Seconds the last sketch's eigendecomposition took (grown builds).
        self.seconds = 0.0
        self._columns: SketchColumns | None = None

    @classmethod
    def available(cls, setup: PrecondSetup) -> bool:
        return setup.rank > 0

    def build(self, obj: LaplaceObjective, setup: PrecondSetup) -> None:
        # keyed by the rank asked for: the sketch may keep fewer columns
        # (directions a rank-deficient GGN does not resolve)
        if self.sketch is None or self.rank != setup.rank:
            self.release()
            self.sketch = nystrom_sketch(obj, setup.rank, chunk_size=setup.chunk_size)
            self.rank = setup.rank

    def build_level(
        self, obj: LaplaceObjective, setup: PrecondSetup, capacity: int
    ) -> None:
        """The sketch at ``setup.rank`` from columns kept for ranks up to
        ``capacity``: a larger rank costs its new columns' products only
        (the automatic rank's levels). At ``capacity`` the columns become the
        sketch (no copy) and are not kept; :meth:`release` drops them before."""
        if self.sketch is not None and self.rank == setup.rank:
            return
        cols = self._columns
        if cols is None or cols.capacity != capacity or cols.k > setup.rank:
            cols = self._columns = nystrom_columns(obj, capacity, setup.chunk_size)
        cols.extend(setup.rank)
        t0 = time.perf_counter()
        last = setup.rank == capacity
        self.sketch = cols.sketch(setup.rank, in_place=last)
        if self.sketch.U.device.type == "cuda":
            torch.cuda.synchronize(self.sketch.U.device)
        self.seconds, self.rank = time.perf_counter() - t0, setup.rank
        if last:
            self._columns = None

    def release(self) -> None:
        """Drop the columns kept for a larger rank (the sketch stays)."""
        self._columns = None

    def apply(self, h_factor: float, prior_precision: Tensor) -> Preconditioner:
        return nystrom_apply(self.sketch, h_factor, prior_precision)


class KFACPreconditioner(PreconditionerMethod):
    """Kronecker-factored GGN of the ``Linear``/``Conv2d`` layers
    (:mod:`laplace_hfl.engine.kfac`)."""

    name = "kfac"

    def __init__(self) -> None:
        self.factors = None

    @classmethod
    def available(cls, setup: PrecondSetup) -> bool:
        module, layout, _ = setup.refit_module()
        return kfac_supported(module, layout)

    def build(self, obj: LaplaceObjective, setup: PrecondSetup) -> None:
        if self.factors is None:
            module, layout, _ = setup.refit_module()
            self.factors = kfac_factors(obj, module, layout)

    def apply(self, h_factor: float, prior_precision: Tensor) -> Preconditioner:
        return kfac_apply(self.factors, h_factor, prior_precision)


#: ``preconditioner`` name -> class, in the order ``"auto"`` probes them.
PRECONDITIONERS: dict[str, type[PreconditionerMethod]] = {
    "nystrom": NystromPreconditioner,
    "kfac": KFACPreconditioner,
    "none": NoPreconditioner,
}
