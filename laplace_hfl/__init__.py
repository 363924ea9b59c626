"""laplace-hfl: Hessian-free Laplace (HFL / RegVar) for laplace-torch.

Importing this package registers ``hessian_structure="hfl"`` with
``laplace.Laplace`` for ``subset_of_weights="all"`` and ``"last_layer"``. A
laplace-torch that discovers structures by entry point (group
``laplace.structures``, declared in ``pyproject.toml``) imports it itself.
"""

from __future__ import annotations

import os
import warnings

with warnings.catch_warnings():
    # The deprecated ``torch.jit.script`` is called at import time by asdl (a
    # laplace-torch backend, on ``import laplace``) and by torch's own
    # ``torch._decomp.decompositions_for_jvp``, which forward-mode AD loads
    # on the first ``jvp`` (every GGN product: the first CG refit,
    # ``pred_type="nn"``, ``target="hessian"``). Both are imported here, once,
    # with that FutureWarning (not actionable for users) silenced.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
    )
    import laplace  # noqa: F401

    if os.environ.get("PYTORCH_JIT", "1") == "1" and __debug__:
        # the condition under which torch.autograd.forward_ad loads it
        import torch._decomp.decompositions_for_jvp  # noqa: F401

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
