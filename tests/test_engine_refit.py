"""Unit tests of ``laplace_hfl.engine.refit`` without the estimator: the refits
run on the ``LaplaceObjective`` of a tiny float64 network
(``conftest.engine_objective``), and their answers are compared with dense
float64 references (``conftest.dense_reference``: ``J P^-1 J^T`` by
``torch.func`` with ``P`` the GGN + prior or the exact Hessian; a closed-form
ridge solution for a linear model).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import (
    DT,
    PRIOR,
    SIGMA,
    dense_reference,
    engine_objective,
    saddle_regression,
)
from torch import nn

from laplace_hfl.engine.functional import objective_grad, output_jacobians
from laplace_hfl.engine.refit import (
    RefitDiagnostics,
    RefitSettings,
    galerkin_refine,
    perturbed_refits,
    unperturbed_refit,
)
from laplace_hfl.errors import (
    IndefiniteHessianError,
    NonStationaryMAPWarning,
    RefitConvergenceWarning,
)


def _rows(obj, Xq):
    """Jacobian rows ``(B * C, P)`` of the queries: the refit directions."""
    J, _ = output_jacobians(obj.forward, obj.theta_map, Xq)
    return J.reshape(-1, J.shape[-1])


def _queries(X, n=6):
    return X[:n] * 1.3 + 0.2


@pytest.mark.parametrize(
    "name, likelihood",
    [("regression_1d", "regression"), ("classification", "classification")],
)
def test_ggn_refits_give_the_dense_covariance(request, name, likelihood):
    """Target "ggn" with the residual rule at 1e-10: ``V U^T`` is the dense
    ``J (GGN + prior)^-1 J^T`` to 1e-8, symmetric (Rayleigh-Ritz step), and
    each direction's certified bracket holds its variance."""
    model, X, y = request.getfixturevalue(name)
    obj = engine_objective(model, X, y, likelihood)
    Xq = _queries(X)
    settings = RefitSettings(rtol=1e-10)
    base = unperturbed_refit(obj, settings)
    V = _rows(obj, Xq)
    U, diag = perturbed_refits(obj, base, V, settings)
    _, joint = dense_reference(model, X, y, Xq, likelihood, "ggn")
    cov = V @ U.T
    scale = float(joint.diagonal().max())
    assert float((cov - joint).abs().max()) <= 1e-8 * scale
    torch.testing.assert_close(cov, cov.T, rtol=0, atol=1e-12 * scale)
    truth = joint.diagonal()
    assert (diag.variance_lower <= truth * (1 + 1e-10)).all()
    assert (diag.variance_upper >= truth * (1 - 1e-10)).all()
    assert diag.converged.all() and diag.products > 0
    # each refit is scaled to move its output by eps posterior sd
    torch.testing.assert_close(diag.eps, settings.eps / truth.sqrt(), rtol=1e-8, atol=0)


def test_ggn_variance_stop_within_its_tolerance(classification):
    """Default settings: the variance stop (1e-3) bounds every covariance
    entry by ``1e-3 sqrt(var_i var_j)`` after the Rayleigh-Ritz step."""
    model, X, y = classification
    obj = engine_objective(model, X, y, "classification")
    Xq = _queries(X, 10)
    settings = RefitSettings()
    assert settings.variance_rtol == 1e-3
    U, diag = perturbed_refits(
        obj, unperturbed_refit(obj, settings), _rows(obj, Xq), settings
    )
    _, joint = dense_reference(model, X, y, Xq, "classification", "ggn")
    sd = joint.diagonal().sqrt()
    err = (_rows(obj, Xq) @ U.T - joint).abs()
    assert (err <= 1e-3 * sd[:, None] * sd[None, :] * (1 + 1e-10)).all()
    assert (
        (diag.variance_upper - diag.variance_lower) <= 1e-3 * diag.variance_lower
    ).all()


def test_hessian_refits_give_the_dense_covariance(regression_1d):
    """Target "hessian" at a stationary MAP: central differences of Newton-CG
    network refits give ``J H^-1 J^T`` with ``H`` the exact Hessian of the
    objective, to 1e-5 (the central difference's bias is second order in
    eps); no bracket is certified (NaN)."""
    model, X, y = regression_1d
    obj = engine_objective(model, X, y, "regression")
    Xq = _queries(X)
    settings = RefitSettings(target="hessian", rtol=1e-10)
    base = unperturbed_refit(obj, settings)
    V = _rows(obj, Xq)
    U, diag = perturbed_refits(obj, base, V, settings)
    _, joint = dense_reference(model, X, y, Xq, "regression", "hessian")
    scale = float(joint.diagonal().max())
    assert float((V @ U.T - joint).abs().max()) <= 1e-5 * scale
    assert (
        torch.isnan(diag.variance_lower).all()
        and torch.isnan(diag.variance_upper).all()
    )
    assert diag.converged.all()


def test_stationary_map_is_its_own_base_point(regression_1d):
    model, X, y = regression_1d
    obj = engine_objective(model, X, y, "regression")
    for target in ("ggn", "hessian"):
        base = unperturbed_refit(obj, RefitSettings(target=target))
        assert torch.equal(base.theta, obj.theta_map)
        assert base.iterations == 0 and base.displacement == 0.0


def test_ggn_base_point_of_a_linear_model_is_the_ridge_solution():
    """A linear model (GGN = Hessian, quadratic objective) away from its MAP:
    the unperturbed refit lands on the closed-form minimiser
    ``(X1^T X1 / sigma^2 + p I)^-1 X1^T y / sigma^2``, 1e-9 relative."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=DT)
    y = X @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DT) + 0.1
    model = nn.Linear(3, 1).to(DT)  # its weights: far from the MAP
    obj = engine_objective(model, X, y, "regression")
    base = unperturbed_refit(obj, RefitSettings(rtol=1e-12))
    X1 = torch.cat([X, torch.ones(40, 1, dtype=DT)], 1)
    A = X1.T @ X1 / SIGMA**2 + PRIOR * torch.eye(4, dtype=DT)
    w = torch.linalg.solve(A, X1.T @ y[:, 0] / SIGMA**2)
    theta = torch.cat([base.theta[:3], base.theta[3:]])  # weight row, then bias
    assert float((theta - w).norm() / w.norm()) <= 1e-9
    assert base.map_grad_norm > 1 and base.iterations > 0
    assert base.displacement == pytest.approx(
        float((w - obj.theta_map).norm()), rel=1e-9
    )


def test_hessian_base_point_is_the_nearby_minimum(regression_1d):
    """A MAP moved off its stationary point: the network refit reaches a
    minimum of ``L`` (gradient 1e-6 of the MAP's), says so with a
    NonStationaryMAPWarning, and reports the distance moved."""
    model, X, y = regression_1d
    with torch.no_grad():
        model[2].bias += 2e-3
    obj = engine_objective(model, X, y, "regression")
    settings = RefitSettings(target="hessian")
    with pytest.warns(NonStationaryMAPWarning, match="target='ggn'"):
        base = unperturbed_refit(obj, settings)
    g = objective_grad(obj, base.theta[None])[0]
    assert float(g.norm()) <= 1e-6 * base.map_grad_norm  # rtol's default
    assert base.displacement == pytest.approx(
        float((base.theta - obj.theta_map).norm()), rel=1e-12
    )


def test_zero_directions_are_skipped_and_chunks_agree(classification):
    """A zero Jacobian row costs no refit and gets a zero answer; the answer
    does not depend on how the directions are chunked (1e-10)."""
    model, X, y = classification
    obj = engine_objective(model, X, y, "classification")
    settings = RefitSettings(rtol=1e-10)
    base = unperturbed_refit(obj, settings)
    V = _rows(obj, _queries(X, 4))
    V[3] = 0
    U, diag = perturbed_refits(obj, base, V, settings, chunk_size=64)
    assert torch.equal(U[3], torch.zeros_like(U[3]))
    assert diag.eps.numel() == V.shape[0] - 1
    U1, diag1 = perturbed_refits(obj, base, V, settings, chunk_size=1)
    cov, cov1 = V @ U.T, V @ U1.T
    torch.testing.assert_close(
        cov1, cov, rtol=0, atol=1e-10 * float(cov.diagonal().max())
    )
    assert diag1.passes >= diag.passes  # one chunk at a time: more data passes


def test_no_direction_gives_empty_diagnostics(regression_1d):
    model, X, y = regression_1d
    obj = engine_objective(model, X, y, "regression")
    base = unperturbed_refit(obj, RefitSettings())
    V = torch.zeros(2, obj.theta_map.numel(), dtype=DT)
    U, diag = perturbed_refits(obj, base, V, RefitSettings())
    assert torch.equal(U, V) and diag.converged.shape == (2, 0)


def test_galerkin_refine_keeps_exact_solutions_and_symmetrises():
    """Exact solutions (zero residuals) come back unchanged (1e-10); inexact
    ones become answers whose cross terms ``V U~^T`` are symmetric positive
    semi-definite and closer to ``V A^-1 V^T`` than before."""
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=DT))
    A = (Q * torch.logspace(0, 2, 12, dtype=DT)) @ Q.T
    V = torch.randn(4, 12, generator=g, dtype=DT)
    U = torch.linalg.solve(A, V.T).T
    truth = V @ U.T
    torch.testing.assert_close(galerkin_refine(V, U, V - U @ A), U, rtol=1e-10, atol=0)
    rough = U + 1e-3 * torch.randn(4, 12, generator=g, dtype=DT)
    refined = galerkin_refine(V, rough, V - rough @ A)
    C = V @ refined.T
    torch.testing.assert_close(C, C.T, rtol=0, atol=1e-12 * float(truth.abs().max()))
    assert float(torch.linalg.eigvalsh(C).min()) >= -1e-12 * float(truth.abs().max())
    assert (C - truth).norm() < (V @ rough.T - truth).norm()


def test_indefinite_hessian_raises():
    """A saddle of ``L`` (trained without the prior's weight decay): the
    network refits meet negative curvature and say to use target='ggn'."""
    model, X, y = saddle_regression()
    obj = engine_objective(model, X, y, "regression", sigma=0.05, prior=1e-4)
    settings = RefitSettings(target="hessian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonStationaryMAPWarning)
        with pytest.raises(IndefiniteHessianError, match="target='ggn'"):
            base = unperturbed_refit(obj, settings)
            perturbed_refits(obj, base, _rows(obj, X[:4]), settings)


def test_unconverged_refits_warn_with_numbers(regression_1d):
    model, X, y = regression_1d
    obj = engine_objective(model, X, y, "regression")
    settings = RefitSettings(rtol=1e-10, max_iter=1)
    base = unperturbed_refit(obj, settings)
    with pytest.warns(RefitConvergenceWarning, match=r"did not converge.*max_iter=1"):
        _, diag = perturbed_refits(obj, base, _rows(obj, X[:3]), settings)
    assert not diag.converged.all() and int(diag.iterations.max()) == 1


def test_variance_rtol_default_and_validation():
    assert RefitSettings().variance_rtol == 1e-3
    assert RefitSettings(rtol=1e-9).variance_rtol is None  # residual rule
    assert RefitSettings(rtol=1e-9, var_rtol=1e-5).variance_rtol == 1e-5
    with pytest.raises(ValueError, match="var_rtol"):
        RefitSettings(var_rtol=0.0)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(target="kfac"), "'ggn'"),
        (dict(eps=0.0), "eps"),
        (dict(rtol=-1.0), "rtol"),
        (dict(var_rtol=1.0), "var_rtol"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_newton=2.5), "max_newton"),
    ],
)
def test_settings_refuse_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        RefitSettings(**kw)


def test_diagnostics_concatenate_and_summarise():
    def part(m, products):
        return RefitDiagnostics(
            eps=torch.ones(m, dtype=DT),
            residual=torch.full((2, m), 1e-7, dtype=DT),
            iterations=torch.full((2, m), 3),
            converged=torch.ones(2, m, dtype=torch.bool),
            variance_lower=torch.ones(m, dtype=DT),
            variance_upper=torch.ones(m, dtype=DT),
            products=products,
            passes=1.0,
            choice="cg: as set",
        )

    both = RefitDiagnostics.concat([part(2, 6.0), part(3, 9.0)])
    assert both.eps.shape == (5,) and both.converged.shape == (2, 5)
    assert both.variance_lower.shape == (5,)
    assert both.products == 15.0 and both.passes == 2.0
    assert both.summary() == (
        "cg/none: 10/10 refits converged, max 3 iterations, max residual 1.0e-07, "
        "15 products; cg: as set"
    )
    assert repr(both) == f"RefitDiagnostics({both.summary()})"
