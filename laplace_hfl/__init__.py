"""laplace-hfl: Hessian-free Laplace (HFL / RegVar) for laplace-torch.

Importing this package registers ``hessian_structure="hfl"`` with
``laplace.Laplace`` for ``subset_of_weights="all"`` and ``"last_layer"``. A
laplace-torch that discovers structures by entry point (group
``laplace.structures``, declared in ``pyproject.toml``) imports it itself.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    # asdl (a laplace-torch backend) calls the deprecated ``torch.jit.script``
    # when laplace-torch is imported; the FutureWarning is not actionable for
    # users of this package (or of the ``laplace-hfl`` CLI, ``--help`` included).
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
    )
    import laplace  # noqa: F401

from laplace_hfl.distributed import HFLDistributedError
from laplace_hfl.errors import (
    HFLNotFittedError,
    IndefiniteHessianError,
    NonStationaryMAPWarning,
    PSDClippingWarning,
    RefitConvergenceWarning,
)
from laplace_hfl.hessian_free import HessianFreeLaplace
from laplace_hfl.last_layer import HessianFreeLLLaplace

__version__ = "0.1.0"

__all__ = [
    "HessianFreeLaplace",
    "HessianFreeLLLaplace",
    "HFLDistributedError",
    "HFLNotFittedError",
    "IndefiniteHessianError",
    "NonStationaryMAPWarning",
    "PSDClippingWarning",
    "RefitConvergenceWarning",
]
