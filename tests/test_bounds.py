"""Certified variance brackets: Gauss / Gauss-Radau quadrature of the CG
coefficients brackets the dense float64 truth for every direction."""

from __future__ import annotations

import pytest
import torch
from conftest import DT, PRIOR, SIGMA, dense_reference, loader, param_layout
from laplace import Laplace
from torch.func import functional_call, jacrev

from laplace_hfl.engine.functional import ggn_matvec
from laplace_hfl.engine.kfac import kfac_apply, kfac_factors
from laplace_hfl.engine.preconditioner import nystrom_apply, nystrom_sketch
from laplace_hfl.engine.solvers import batched_cg

#: Rounding slack of a bracket end (float64 CG on well-scaled problems).
SLACK = 1e-10


def _inside(lower, upper, truth):
    assert torch.isfinite(lower).all() and torch.isfinite(upper).all()
    assert (lower <= truth * (1 + SLACK)).all()
    assert (upper >= truth * (1 - SLACK)).all()


def test_brackets_of_preconditioned_cg_contain_truth():
    """Random SPD systems (condition 1e4), a random SPD preconditioner and the
    exact smallest eigenvalue of M^-1 A as floor: every iterate's bracket holds
    b^T A^-1 b, and the brackets close."""
    g = torch.Generator().manual_seed(0)
    n, m = 50, 40
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q * torch.logspace(0, 4, n, dtype=DT) @ Q.T
    W = torch.randn(n, n, generator=g, dtype=DT)
    Minv = torch.linalg.inv(A + W @ W.T)
    B = torch.randn(m, n, generator=g, dtype=DT)
    truth = (B * torch.linalg.solve(A, B.T).T).sum(1)
    L = torch.linalg.cholesky(Minv)
    floor = float(torch.linalg.eigvalsh(L.T @ A @ L).min())
    for k in (1, 3, 10, 60):
        res = batched_cg(
            lambda idx, V: V @ A, B, torch.zeros(m, dtype=DT), k,
            precond=lambda R: R @ Minv, spectrum_floor=floor,
        )  # fmt: skip
        _inside(res.lower, res.upper, truth)
        assert torch.allclose(res.lower, (B * res.x).sum(1), rtol=1e-9)
    assert ((res.upper - res.lower) <= 1e-8 * truth).all()
    # the variance stop: brackets within var_rtol, fewer products
    stop = batched_cg(
        lambda idx, V: V @ A, B, torch.zeros(m, dtype=DT), 200,
        precond=lambda R: R @ Minv, spectrum_floor=floor, var_rtol=1e-3,
    )  # fmt: skip
    assert stop.converged.all()
    assert ((stop.upper - stop.lower) <= 1e-3 * stop.lower).all()
    assert (stop.lower >= truth * (1 - 1e-3)).all()
    assert stop.products == int(stop.iterations.sum())
    assert stop.passes == int(stop.iterations.max())


def _floor_check(apply, floor, A):
    """floor <= lambda_min(M^-1 A), dense."""
    Minv = apply(torch.eye(A.shape[0], dtype=DT))
    Minv = 0.5 * (Minv + Minv.T)
    L = torch.linalg.cholesky(Minv)
    assert floor <= float(torch.linalg.eigvalsh(L.T @ A @ L).min()) * (1 + 1e-12)


@pytest.mark.parametrize("rank", [2, 8, 30])
def test_preconditioner_floors_are_valid(classification, rank):
    """Nyström (any rank) and KFAC floors lie below the spectrum of M^-1 A."""
    model, X, y = classification
    prior = torch.linspace(0.3, 2.0, sum(p.numel() for p in model.parameters()))
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=prior.to(DT),
        temperature=0.7, solver="cg",
    )  # fmt: skip
    la.fit(loader(X, y))
    obj = la.objective()
    P = obj.theta_map.numel()
    A = ggn_matvec(obj, torch.eye(P, dtype=DT))
    A = 0.5 * (A + A.T)
    pre = nystrom_apply(nystrom_sketch(obj, rank), obj.h_factor, obj.prior_precision)
    _floor_check(pre, pre.floor, A)
    kf = kfac_apply(  # all-weights HFL refits every parameter of the model
        kfac_factors(obj, model, param_layout(model)), obj.h_factor, obj.prior_precision
    )
    _floor_check(kf, kf.floor, A)


def _jacobians(model, Xq, last_layer):
    names = [n for n, _ in model.named_parameters()]
    names = names[-2:] if last_layer else names
    base = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [base[n].numel() for n in names]
    theta = torch.cat([base[n].flatten() for n in names])

    def f(th):
        params = dict(base)
        for n, c in zip(names, torch.split(th, sizes)):
            params[n] = c.reshape(base[n].shape)
        return functional_call(model, params, (Xq,))

    return jacrev(f)(theta)  # (B, C, P)


CASES = [  # (fixture, likelihood, query points, last_layer, preconditioner)
    ("regression_1d", "regression", 120, False, "nystrom"),
    ("regression_1d", "regression", 60, True, "none"),
    ("regression_multi", "regression", 60, False, "none"),
    ("regression_multi", "regression", 60, True, "kfac"),
    ("classification", "classification", 80, False, "nystrom"),
    ("classification", "classification", 60, False, "kfac"),
    ("classification", "classification", 60, True, "nystrom"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[3]}-{c[4]}")
def test_bracket_contains_dense_truth(case, request):
    """Target "ggn": each direction's bracket holds the dense float64
    J (GGN + prior)^-1 J^T diagonal, and the reported variance (the lower end)
    is within the default variance tolerance 1e-3 of it. 1,260 directions over
    the cases (regression and classification, all weights and last layer, the
    three preconditioners)."""
    name, likelihood, n_query, last_layer, pre = case
    model, X, y = request.getfixturevalue(name)
    g = torch.Generator().manual_seed(3)
    Xq = X[torch.randint(len(X), (n_query,), generator=g)] * 1.5 + 0.3
    ref, _ = dense_reference(model, X, y, Xq, likelihood, "ggn", last_layer)
    truth = ref.diagonal(0, 1, 2).flatten()
    kw = {"sigma_noise": SIGMA} if likelihood == "regression" else {}
    subset = "last_layer" if last_layer else "all"
    la = Laplace(
        model, likelihood, subset, "hfl", prior_precision=PRIOR, solver="cg",
        preconditioner=pre, chunk_size=50, **kw,
    )  # fmt: skip
    la.fit(loader(X, y))
    var = la.functional_variance(_jacobians(model, Xq, last_layer))
    d = la.last_diagnostics
    assert d.preconditioner == pre
    assert d.variance_lower.numel() == truth.numel()
    _inside(d.variance_lower, d.variance_upper, truth)
    assert torch.allclose(var.diagonal(0, 1, 2).flatten(), d.variance_lower)
    # covariances: second order after the Galerkin step, within
    # var_rtol * sqrt(var_i var_j) (Cauchy-Schwarz on the projected errors)
    sd = ref.diagonal(0, 1, 2).sqrt()
    scale = sd[:, :, None] * sd[:, None, :]
    assert ((var - ref).abs() <= 1e-3 * scale * (1 + SLACK)).all()
    assert d.converged.all()
    assert (d.variance_upper - d.variance_lower <= 1e-3 * d.variance_lower).all()
    assert ((truth - d.variance_lower) / truth).max() <= 1e-3
    assert d.products >= d.iterations[0].sum() > 0


def test_hessian_target_has_no_bracket(regression_1d):
    """The exact Hessian has no known lower spectrum bound: NaN brackets,
    residual rule."""
    model, X, y = regression_1d
    la = Laplace(
        model, "regression", "all", "hfl", sigma_noise=SIGMA,
        prior_precision=PRIOR, solver="cg", target="hessian",
    )  # fmt: skip
    la.fit(loader(X, y))
    la.glm_predictive(X[:3])
    d = la.last_diagnostics
    assert torch.isnan(d.variance_lower).all() and torch.isnan(d.variance_upper).all()
    assert d.products > 0


def test_float32_products_float64_recurrences(classification):
    """compute_dtype=float32: products in float32, CG and brackets in float64.
    The brackets hold the float64 truth up to the products' rounding (the
    solve is that of A + E, |E| ~ 1e-7 |A|): 1e-5 slack here; the variances
    come back in float32 and within the variance tolerance."""
    model, X, y = classification
    Xq = X[:40] * 1.5 + 0.3
    ref, _ = dense_reference(model, X, y, Xq, "classification", "ggn")
    truth = ref.diagonal(0, 1, 2).flatten()
    la = Laplace(
        model, "classification", "all", "hfl", prior_precision=PRIOR, solver="cg",
        preconditioner="nystrom", compute_dtype=torch.float32,
    )  # fmt: skip
    la.fit(loader(X, y))
    var = la.functional_variance(_jacobians(model, Xq, False).float())
    d = la.last_diagnostics
    assert var.dtype == torch.float32
    assert d.variance_lower.dtype == torch.float64
    assert (d.variance_lower <= truth * (1 + 1e-5)).all()
    assert (d.variance_upper >= truth * (1 - 1e-5)).all()
    assert ((var.diagonal(0, 1, 2).flatten() - truth).abs() / truth).max() <= 1e-3
