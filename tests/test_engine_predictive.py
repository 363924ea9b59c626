"""Unit tests of ``laplace_hfl.engine.predictive``: covariances assembled from
Jacobian rows and exact solves ``U = A^-1 J^T`` equal the dense
``J A^-1 J^T`` (float64), the PSD projection is the nearest PSD matrix and
warns only when it clips more than rounding, and input gradients are those of
the dense formula.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DT

from laplace_hfl.engine.predictive import (
    joint_covariance,
    marginal_covariance,
    symmetric_psd,
)
from laplace_hfl.errors import PSDClippingWarning

B, C, P = 4, 3, 10


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=DT))
    A = (Q * torch.logspace(0, 2, P, dtype=DT)) @ Q.T
    Js = torch.randn(B, C, P, generator=g, dtype=DT)
    U = torch.linalg.solve(A, Js.reshape(-1, P).T).T  # (B C, P)
    return A, Js, U


def test_marginal_and_joint_covariances_match_dense():
    A, Js, U = _problem()
    Ainv = torch.linalg.inv(A)
    marg = torch.einsum("bcp,pq,bdq->bcd", Js, Ainv, Js)
    V = Js.reshape(-1, P)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PSDClippingWarning)
        torch.testing.assert_close(marginal_covariance(Js, U), marg, rtol=1e-10, atol=0)
        torch.testing.assert_close(
            joint_covariance(Js, U), V @ Ainv @ V.T, rtol=1e-10, atol=1e-12
        )


def test_psd_projection_is_the_nearest_psd_matrix():
    """An indefinite symmetric input: eigenvalues clipped at zero (the Frobenius
    projection), with a warning naming the size of the clip; a PSD input comes
    back symmetrised and otherwise unchanged."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=DT))
    lam = torch.tensor([-0.5, 0.1, 1.0, 2.0, 3.0], dtype=DT)
    M = (Q * lam) @ Q.T
    with pytest.warns(PSDClippingWarning, match=r"1\.67e-01 x the largest"):
        S = symmetric_psd(M[None])[0]
    torch.testing.assert_close(S, (Q * lam.clamp_min(0)) @ Q.T, rtol=0, atol=1e-12)
    skew = torch.zeros(5, 5, dtype=DT)
    skew[0, 1], skew[1, 0] = 1e-3, -1e-3
    psd = (Q * lam.abs()) @ Q.T
    torch.testing.assert_close(symmetric_psd(psd + skew), psd, rtol=0, atol=1e-14)


def test_rounding_sized_clips_are_silent():
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=DT))
    M = (Q * torch.tensor([-1e-9, 1.0, 2.0, 3.0], dtype=DT)) @ Q.T
    with warnings.catch_warnings():
        warnings.simplefilter("error", PSDClippingWarning)
        S = symmetric_psd(M)
    assert float(torch.linalg.eigvalsh(S).min()) >= -1e-15


@pytest.mark.parametrize("kind", ["marginal", "joint"])
def test_input_gradients_are_those_of_the_dense_formula(kind):
    """With ``Js.requires_grad`` (``enable_backprop``), ``U`` is a constant but
    the gradient in ``J`` is that of ``J A^-1 J^T`` (1e-10), and nothing is
    clipped."""
    A, Js, U = _problem()
    Ainv = torch.linalg.inv(A)
    W = torch.randn(B * C, B * C, generator=torch.Generator().manual_seed(3), dtype=DT)
    J1 = Js.clone().requires_grad_(True)
    J2 = Js.clone().requires_grad_(True)
    if kind == "marginal":
        got = marginal_covariance(J1, U)
        ref = torch.einsum("bcp,pq,bdq->bcd", J2, Ainv, J2)
        weights = W[:C, :C]
    else:
        got = joint_covariance(J1, U)
        V = J2.reshape(-1, P)
        ref = V @ Ainv @ V.T
        weights = W
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    (got * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(J1.grad, J2.grad, rtol=1e-10, atol=1e-12)
