"""Assemble predictive covariances from Jacobian rows and refit displacements."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from laplace_hfl.errors import PSDClippingWarning

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
        warnings.warn(
            f"Clipped a negative predictive eigenvalue of {worst:.2e} x the "
            "largest one to zero. The refits are not accurate enough: lower "
            "rtol or raise max_iter.",
            PSDClippingWarning,
            stacklevel=3,
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
    return symmetric_psd(torch.einsum("bcp,bkp->bck", Js, U.reshape(B, C, P)))


def joint_covariance(Js: Tensor, U: Tensor) -> Tensor:
    """Joint covariance of all outputs of all inputs, input-major.

    Parameters
    ----------
    Js : Tensor
        Jacobians ``(B, C, P)``.
    U : Tensor
        Refit displacements ``(B*C, P)``.

    Returns
    -------
    Tensor
        ``(B*C, B*C)``, symmetric PSD.
    """
    V = Js.reshape(-1, Js.shape[-1])
    return symmetric_psd(V @ U.T)
