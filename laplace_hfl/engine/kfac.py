"""KFAC preconditioner of the refit solves, from laplace-torch's Kron machinery.

Every refit solve shares ``A = h G + diag(p_0)`` (``G`` the data GGN, or the
exact Hessian, close to it near a minimum). Kronecker-factored curvature
(KFAC, Martens & Grosse 2015) approximates ``G`` block-diagonally, one
``B (x) A`` block per ``Linear``/``Conv2d`` weight and one dense block per bias;
its inverse is cheap through the factors' eigendecompositions. The factors are
computed by laplace-torch's :class:`~laplace.curvature.CurvlinopsGGN` backend
(``kron``, exact type-2 GGN factors via curvlinops' ``KFACLinearOperator``),
summed over batches exactly as ``KronLaplace.fit`` does, and decomposed by
:meth:`laplace.utils.matrix.Kron.decompose`. Nothing is re-derived here.

The preconditioner is ``M = h K + diag(delta)`` with ``delta`` the prior
precision averaged over each block (:class:`~laplace.utils.matrix.KronDecomposed`
adds one scalar per block): exact for a scalar or per-parameter-tensor
(layer-wise) prior, the block mean of a general diagonal prior otherwise. It
changes how fast the solves converge, never what they converge to.

KFAC covers ``Linear`` and ``Conv2d`` layers. :func:`kfac_supported` says
whether every refit parameter belongs to one; where not (BatchNorm, embeddings,
attention, parameters out of module order) the shell falls back to the Nyström
sketch (:mod:`laplace_hfl.engine.preconditioner`). The backend registers hooks on the
module it is given: it always runs on a deep copy, so the user's model is never
touched.
"""

from __future__ import annotations

import copy

import torch
from laplace.curvature import CurvlinopsGGN
from laplace.utils.matrix import Kron, KronDecomposed
from torch import Tensor, nn

from laplace_hfl.engine.functional import LaplaceObjective, ParamLayout, reduce_data
from laplace_hfl.engine.preconditioner import Preconditioner

__all__ = ["kfac_supported", "kfac_factors", "kfac_apply"]

_KFAC_MODULES = (nn.Linear, nn.Conv2d)


def _kfac_order(module: nn.Module, refit: set[str]) -> list[str] | None:
    """Refit parameter names in the order of laplace-torch's Kron blocks, or
    None where a refit parameter is outside a fully refit Linear/Conv2d."""
    names = []
    for prefix, sub in module.named_modules():
        own = [
            f"{prefix}.{n}" if prefix else n
            for n, _ in sub.named_parameters(recurse=False)
        ]
        if not own:
            continue
        trainable = [n in refit for n in own]
        if not any(trainable):
            continue
        if not isinstance(sub, _KFAC_MODULES) or not all(trainable):
            return None
        names.append(f"{prefix}.weight" if prefix else "weight")
        if sub.bias is not None:
            names.append(f"{prefix}.bias" if prefix else "bias")
    return names


def kfac_supported(module: nn.Module, layout: ParamLayout) -> bool:
    """Whether KFAC covers every refit parameter of ``module``, in layout order.

    True when each parameter in ``layout`` belongs to a ``Linear`` or ``Conv2d``
    whose parameters are all refit, and Kron's block order (module order,
    weight before bias) is the layout's order.
    """
    order = _kfac_order(module, set(layout.names))
    return order is not None and tuple(order) == layout.names


def _refit_copy(
    module: nn.Module, layout: ParamLayout, dtype: torch.dtype
) -> nn.Module:
    """Deep copy whose trainable parameters are exactly those in ``layout``."""
    clone = copy.deepcopy(module).to(dtype)
    refit = set(layout.names)
    for name, p in clone.named_parameters():
        p.requires_grad_(name in refit)
        p.grad = None
    return clone


def kfac_factors(
    obj: LaplaceObjective, module: nn.Module, layout: ParamLayout
) -> KronDecomposed:
    """Eigendecomposed KFAC of the data GGN at the MAP (no prior, ``h = 1``).

    Parameters
    ----------
    obj : LaplaceObjective
        Supplies the batches, the likelihood and the MAP.
    module : torch.nn.Module
        The refit module (deep-copied; never modified).
    layout : ParamLayout
        Its refit parameters; must satisfy :func:`kfac_supported`.

    Returns
    -------
    laplace.utils.matrix.KronDecomposed

    Raises
    ------
    ValueError
        If KFAC does not cover the refit parameters.
    """
    if not kfac_supported(module, layout):
        raise ValueError(
            "KFAC covers Linear and Conv2d layers only, and every refit "
            "parameter must belong to one; use preconditioner='nystrom' or 'auto'."
        )
    theta = obj.theta_map
    clone = _refit_copy(module, layout, theta.dtype)
    params = dict(clone.named_parameters())
    with torch.no_grad():
        for name, value in layout.unflatten(theta).items():
            params[name].copy_(value)
    batches = list(obj.batches())
    n_local = torch.tensor(float(sum(int(y.shape[0]) for _, y in batches)))
    N = int(reduce_data(obj, n_local.to(theta)))  # all processes' data
    backend = CurvlinopsGGN(clone, obj.likelihood)
    total: Kron | None = None
    for X, y in batches:
        _, kron = backend.kron(X, y, N=N)
        total = kron if total is None else total + kron
    if total is None:  # no local batches (an empty shard): zero factors
        params = [p for p in clone.parameters() if p.requires_grad]
        total = Kron.init_from_model(params, theta.device, theta.dtype)
    if obj.reduce is not None:  # sum each factor over processes
        total = Kron([[reduce_data(obj, F) for F in block] for block in total.kfacs])
    return total.decompose()


def kfac_apply(
    factors: KronDecomposed,
    h_factor: float,
    prior_precision: Tensor,
) -> Preconditioner:
    """The preconditioner ``(h K + diag(delta))^{-1}``, row-wise.

    ``delta`` is the block mean of ``prior_precision``: exact for a scalar or
    layer-wise prior.

    Returns
    -------
    Preconditioner
        Maps residuals ``(m, P)`` to preconditioned residuals ``(m, P)``. Its
        spectrum floor is ``min(p_0) / lambda_max(M)`` (Rayleigh quotients:
        ``x^T A x >= min(p_0) |x|^2`` and ``x^T M x <= lambda_max(M) |x|^2``);
        KFAC is not below the GGN, so nothing sharper is proven. Valid, but
        loose: the certified brackets close later than with Nyström.
    """
    sizes = [
        int(torch.Size([len(ls) for ls in eigvals]).numel())
        for eigvals in factors.eigenvalues
    ]
    deltas = torch.stack(
        [block.mean() for block in torch.split(prior_precision, sizes)]
    ).to(factors.eigenvectors[0][0])
    M = factors * h_factor + deltas

    def apply(R: Tensor) -> Tensor:
        return M.bmm(R[:, None, :], exponent=-1)[:, 0]

    top = max(
        float(torch.stack([ls.abs().max() for ls in block]).prod() + delta)
        for block, delta in zip(M.eigenvalues, M.deltas.flatten().tolist())
    )
    return Preconditioner(apply, float(prior_precision.min()) / top)
