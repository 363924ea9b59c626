"""HFL against dense float64 references.

Tolerances (median relative error <= 1e-3, max <= 1e-2). Every entry of
every (C x C) covariance is compared on the correlation scale,
``|est - ref| / sqrt(ref_ii ref_jj)``, which is the relative error on the
diagonal and stays meaningful for off-diagonal entries near zero.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    DT,
    PRIOR,
    SIGMA,
    dense_reference,
    loader,
    make_regression,
    reference_glm_predictive,
)
from laplace import Laplace
from laplace.curvature import (
    AsdlGGN,
    BackPackGGN,
    CurvlinopsGGN,
    CurvlinopsHessian,
)

MEDIAN_TOL, MAX_TOL = 1e-3, 1e-2


def scaled_err(est, ref):
    d = torch.diagonal(ref, dim1=-2, dim2=-1).sqrt()
    scale = d[..., :, None] * d[..., None, :]
    return ((est - ref).abs() / scale).flatten()


def assert_close(est, ref):
    err = scaled_err(est, ref)
    assert err.median() <= MEDIAN_TOL, f"median {err.median():.2e}"
    assert err.max() <= MAX_TOL, f"max {err.max():.2e}"


def fit_hfl(model, X, y, likelihood, subset, target, **kw):
    la = Laplace(
        model, likelihood, subset, "hfl", sigma_noise=SIGMA if likelihood ==
        "regression" else 1.0, prior_precision=PRIOR, target=target, **kw,
    )  # fmt: skip
    la.fit(loader(X, y))
    return la


def fit_full(model, X, y, likelihood, subset, backend):
    la = Laplace(
        copy.deepcopy(model), likelihood, subset, "full", backend=backend,
        sigma_noise=SIGMA if likelihood == "regression" else 1.0,
        prior_precision=PRIOR,
    )  # fmt: skip
    la.fit(loader(X, y))
    return la


CASES = ["regression_1d", "regression_multi", "classification"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("target", ["hessian", "ggn"])
def test_matches_full_laplace_and_dense(case, subset, target, request):
    model, X, y = request.getfixturevalue(case)
    likelihood = "classification" if case == "classification" else "regression"
    Xq = torch.linspace(-3, 3, 7, dtype=DT)[:, None].expand(-1, X.shape[1]) * 1.1
    la = fit_hfl(model, X, y, likelihood, subset, target)
    est = la.glm_predictive(Xq)[1]

    kind = "hessian" if target == "hessian" and subset == "all" else "ggn"
    dense, _ = dense_reference(
        model, X, y, Xq, likelihood, kind, last_layer=subset == "last_layer"
    )
    assert_close(est, dense)

    backend = CurvlinopsHessian if kind == "hessian" else CurvlinopsGGN
    ref = fit_full(model, X, y, likelihood, subset, backend)
    assert_close(est, reference_glm_predictive(ref, Xq)[1])


@pytest.mark.parametrize("backend", [CurvlinopsGGN, BackPackGGN, AsdlGGN])
def test_ggn_target_non_stationary_map(backend):
    """Mean-MSE training without weight decay: the MAP is not stationary for L."""
    model, X, y = make_regression(n=50, hidden=12, seed=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), y).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    Xq = torch.linspace(-4, 4, 9, dtype=DT)[:, None]
    la = fit_hfl(model, X, y, "regression", "all", "ggn")
    est = la.glm_predictive(Xq)[1]
    assert la.map_gradient_norm > 1.0  # really not stationary
    ref = fit_full(model, X, y, "regression", "all", backend)
    assert_close(est, reference_glm_predictive(ref, Xq)[1])
    dense, _ = dense_reference(model, X, y, Xq, "regression", "ggn")
    assert_close(est, dense)


@pytest.mark.parametrize("target", ["hessian", "ggn"])
def test_joint_covariance_matches_dense(regression_multi, target):
    model, X, y = regression_multi
    Xq = torch.randn(4, 2, dtype=DT, generator=torch.Generator().manual_seed(5))
    la = fit_hfl(model, X, y, "regression", "all", target)
    f_mu, f_cov = la(Xq, joint=True)
    assert f_mu.shape == (12,) and f_cov.shape == (12, 12)
    _, dense_joint = dense_reference(model, X, y, Xq, "regression", target)
    assert_close(f_cov, dense_joint)
    # functional_covariance through user-supplied Jacobians agrees too
    ref = fit_full(model, X, y, "regression", "all", CurvlinopsGGN)
    Js, _ = ref.backend.jacobians(Xq)
    assert_close(la.functional_covariance(Js), dense_joint)


def test_functional_variance_from_jacobians(classification):
    model, X, y = classification
    Xq = X[:5] + 0.3
    la = fit_hfl(model, X, y, "classification", "all", "ggn")
    ref = fit_full(model, X, y, "classification", "all", CurvlinopsGGN)
    Js, _ = ref.backend.jacobians(Xq)
    assert_close(la.functional_variance(Js), ref.functional_variance(Js))


def test_diagnostics_report_converged_refits(regression_1d):
    model, X, y = regression_1d
    la = fit_hfl(model, X, y, "regression", "all", "hessian")
    la(X[:3])
    d = la.last_diagnostics
    assert d.converged.all()
    assert (d.residual <= la.hfl_settings.rtol).all()
    assert d.residual.shape == (2, 3)
