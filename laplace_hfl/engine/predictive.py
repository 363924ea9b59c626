"""Assemble predictive covariances from Jacobian rows and refit displacements."""

from __future__ import annotations

import torch
from torch import Tensor

from laplace_hfl.errors import PSDClippingWarning, warn_user

__all__ = ["symmetric_psd", "marginal_covariance", "joint_covariance"]

#: Clipping more than this fraction of the largest eigenvalue triggers a warning.
CLIP_WARN_FRACTION = 1e-6


def symmetric_psd(M: Tensor) -> Tensor:
    """Symmetrise a batch of square matrices and clip negative eigenvalues.

    Parameters
    ----------
    M : Tensor
        ``(..., n, n)``.

    Returns
    -------
    Tensor
        The nearest symmetric PSD matrices in Frobenius norm.

    Warns
    -----
    PSDClippingWarning
        If an eigenvalue below ``-1e-6`` times the largest one was clipped,
        which means the refits were not accurate enough.
    """
    S = 0.5 * (M + M.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(S)
    if bool((evals >= 0).all()):
        return S
    scale = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(S.dtype).tiny)
    worst = float((-evals / scale).max())
    if worst > CLIP_WARN_FRACTION:
        warn_user(
            f"Clipped a negative predictive eigenvalue of {worst:.2e} x the "
            "largest one to zero. The refits are not accurate enough: lower "
            "rtol or raise max_iter.",
            PSDClippingWarning,
        )
    return (evecs * evals.clamp_min(0).unsqueeze(-2)) @ evecs.transpose(-1, -2)


def marginal_covariance(Js: Tensor, U: Tensor) -> Tensor:
    """Per-input output covariance ``J(x_b) P^{-1} J(x_b)^T``.

    Parameters
    ----------
    Js : Tensor
        Jacobians ``(B, C, P)``.
    U : Tensor
        Refit displacements ``(B*C, P)`` for the rows of ``Js``.

    Returns
    -------
    Tensor
        ``(B, C, C)``, symmetric PSD.
    """
    B, C, P = Js.shape
    U = U.reshape(B, C, P)
    if Js.requires_grad:
        return _differentiable_product("bcp,bkp->bck", Js, U)
    return symmetric_psd(torch.einsum("bcp,bkp->bck", Js, U))


def _differentiable_product(eq: str, Js: Tensor, U: Tensor) -> Tensor:
    """``sym(J U^T)`` whose gradient in ``J`` is that of ``J P^{-1} J^T``.

    ``U`` (``P^{-1} J^T`` from refits) is a constant of autograd; since
    ``P^{-1}`` is symmetric, ``d(J P^{-1} J^T) = dJ U^T + U dJ^T``, which is the
    gradient of ``J U^T + U J^T - J_0 U^T`` with ``J_0`` detached. No PSD
    clipping here (eigen-decompositions have unstable gradients).
    """
    JU = torch.einsum(eq, Js, U)
    J0U = torch.einsum(eq, Js.detach(), U)
    out = JU + JU.transpose(-1, -2) - J0U
    return 0.5 * (out + out.transpose(-1, -2))


def joint_covariance(Js: Tensor, U: Tensor) -> Tensor:
    """Joint covariance of all outputs of all inputs, input-major.

    Parameters
    ----------
    Js, U : Tensor
        As in :func:`marginal_covariance`.

    Returns
    -------
    Tensor
        ``(B*C, B*C)``, symmetric PSD.
    """
    V = Js.reshape(-1, Js.shape[-1])
    if V.requires_grad:
        return _differentiable_product("np,mp->nm", V, U)
    return symmetric_psd(V @ U.T)
