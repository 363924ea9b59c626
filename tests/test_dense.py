"""Dense refit solves (solver="dense"/"auto"): exact, cached, chosen by size.

References: the independent torch.func computation of ``J P^{-1} J^T``
(``dense_reference``) and laplace-torch's FullLaplace / FullLLLaplace with the
GGN backend, float64. The dense solver has no iteration tolerance, so agreement
with the torch.func reference is to round-off: relative error <= 1e-8;
FullLaplace differs from that reference itself by ~6e-8 on these networks
(its own route to the covariance), so it is compared at <= 1e-6.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DT,
    PRIOR,
    assert_unchanged,
    dense_reference,
    loader,
    reference_glm_predictive,
    rel_err,
    saddle_regression,
    snapshot,
)
from conftest import fit_hfl as _hfl
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch.func import jacrev

import laplace_hfl.base as base
import laplace_hfl.engine.dense as dense
from laplace_hfl import IndefiniteHessianError
from laplace_hfl.engine.dense import data_ggn, data_hessian, factorize

TOL = 1e-8
FULL_TOL = 1e-6


@pytest.mark.parametrize(
    "case, likelihood, target",
    [
        ("classification", "classification", "ggn"),
        ("regression_multi", "regression", "ggn"),
        ("regression_1d", "regression", "hessian"),
    ],
)
def test_dense_matches_torch_func_reference(request, case, likelihood, target):
    model, X, y = request.getfixturevalue(case)
    snap = snapshot(model)
    Xq = X[:5] * 1.2
    ref, _ = dense_reference(model, X, y, Xq, likelihood, target)
    la = _hfl(model, X, y, likelihood, target=target, solver="dense")
    _, f_var = la.glm_predictive(Xq)
    assert rel_err(f_var, ref).max() <= TOL
    d = la.last_diagnostics
    assert d.solver == "dense" and (d.iterations == 0).all()
    assert (d.residual <= 1e-12).all() and d.converged.all()
    assert_unchanged(model, snap)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_auto_is_dense_and_matches_full_laplace(classification, subset):
    model, X, y = classification
    Xq = X[:6] + 0.5
    full = Laplace(
        model, "classification", subset, "full", prior_precision=PRIOR,
        backend=CurvlinopsGGN,
    )  # fmt: skip
    full.fit(loader(X, y))
    _, ref = reference_glm_predictive(full, Xq)
    snap = snapshot(model)  # (FullLaplace itself switches the model to eval)
    la = _hfl(model, X, y, "classification", subset)
    _, f_var = la.glm_predictive(Xq)
    assert la.last_diagnostics.solver == "dense"
    assert rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2)).max() <= FULL_TOL
    assert_unchanged(model, snap)


def test_dense_equals_cg_to_solver_tolerance(classification):
    model, X, y = classification
    Xq = X[:4] - 0.7
    vars_ = {}
    for solver in ("dense", "cg"):
        la = _hfl(model, X, y, "classification", solver=solver, rtol=1e-10)
        vars_[solver] = la.glm_predictive(Xq)[1]
        assert la.last_diagnostics.solver == solver
    assert rel_err(vars_["cg"], vars_["dense"]).max() <= 1e-6


def test_data_ggn_is_the_jacobian_ggn(regression_multi):
    """G from per-example Jacobians (sub-batched) equals J^T J from torch.func."""
    model, X, y = regression_multi
    la = _hfl(model, X, y, "regression")
    obj = la.objective()
    J = jacrev(obj.forward)(obj.theta_map, X)
    G_ref = torch.einsum("ncp,ncq->pq", J, J)
    P = obj.theta_map.numel()
    for budget in (None, dense.DENSE_BUDGET, 2 * 3 * P):  # P^2 / whole / 1 example
        G = data_ggn(obj, budget=budget)
        assert torch.allclose(G, G_ref, atol=1e-12 * G_ref.abs().max())


def test_data_hessian_is_the_torch_func_hessian(regression_1d):
    model, X, y = regression_1d
    la = _hfl(model, X, y, "regression", target="hessian")
    obj = la.objective()

    def data(th):
        return 0.5 * (obj.forward(th, X) - y).square().sum()

    H_ref = torch.func.hessian(data)(obj.theta_map)
    H = data_hessian(obj, obj.theta_map, chunk_size=7)
    assert torch.allclose(H, H_ref, atol=1e-12 * H_ref.abs().max())


def test_curvature_formed_once_factor_redone_per_prior(classification, monkeypatch):
    model, X, y = classification
    calls = {"ggn": 0, "factor": 0}
    real_ggn, real_factor = dense.data_ggn, dense.factorize

    def spy_ggn(*a, **k):
        calls["ggn"] += 1
        return real_ggn(*a, **k)

    def spy_factor(*a, **k):
        calls["factor"] += 1
        return real_factor(*a, **k)

    import laplace_hfl.engine.curvature as curvature
    import laplace_hfl.engine.solver_objects as solver_objects

    monkeypatch.setattr(curvature, "data_ggn", spy_ggn)
    monkeypatch.setattr(solver_objects, "factorize", spy_factor)
    la = _hfl(model, X, y, "classification")
    Xq = X[:3]
    v1 = la.glm_predictive(Xq)[1]
    la.glm_predictive(X[3:6])
    assert calls == {"ggn": 1, "factor": 1}  # reused across queries
    la.prior_precision = 4 * PRIOR
    v4 = la.glm_predictive(Xq)[1]
    assert calls == {"ggn": 1, "factor": 2}  # G kept, factor redone
    assert (v4.diagonal(0, 1, 2) < v1.diagonal(0, 1, 2)).all()
    # and the refactored answer is FullLaplace's at the new prior
    full = Laplace(
        model, "classification", "all", "full", prior_precision=4 * PRIOR,
        backend=CurvlinopsGGN,
    )  # fmt: skip
    full.fit(loader(X, y))
    ref = reference_glm_predictive(full, Xq)[1]
    assert rel_err(v4.diagonal(0, 1, 2), ref.diagonal(0, 1, 2)).max() <= FULL_TOL


def test_auto_uses_cg_above_the_budget(classification, monkeypatch):
    model, X, y = classification
    monkeypatch.setattr(dense, "DENSE_BUDGET", 10)
    la = _hfl(model, X, y, "classification")
    la.glm_predictive(X[:2])
    assert la.last_diagnostics.solver == "cg"
    assert la.last_diagnostics.iterations.max() > 0


def test_dense_records_map_stationarity(regression_1d):
    model, X, y = regression_1d
    la = _hfl(model, X, y, "regression", solver="dense")
    la(X[:2])
    assert la.map_gradient_norm < 1e-8  # the fixture is trained to stationarity


def test_indefinite_hessian_raises_and_model_unchanged():
    """A MAP trained without weight decay: Hessian + tiny prior is indefinite."""
    model, X, y = saddle_regression()
    snap = snapshot(model)
    la = Laplace(
        model, "regression", "all", "hfl", target="hessian", solver="dense",
        sigma_noise=0.05, prior_precision=1e-4, max_newton=1,
    )  # fmt: skip
    la.fit(loader(X, y))
    with pytest.raises(IndefiniteHessianError, match="target='ggn'"):
        la(X[:4])
    assert_unchanged(model, snap)


def test_factorize_errors():
    Z = torch.zeros(3, 3, dtype=DT)
    with pytest.raises(IndefiniteHessianError, match="not positive definite"):
        factorize(
            -torch.eye(3, dtype=DT), 1.0, torch.full((3,), 0.5, dtype=DT), "hessian"
        )
    with pytest.raises(ValueError, match="positive prior precision"):
        factorize(Z, 1.0, torch.zeros(3, dtype=DT), "ggn")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"solver": "cholesky"}, "solver must be one of"),
        ({"solver": None}, "solver must be one of"),
        ({"solver": 1}, "solver must be one of"),
        ({"solver": "dense", "amortize": 8}, "cannot be combined"),
        ({"solver": "dense", "minibatch_epochs": 4}, "cannot be combined"),
        ({"preconditioner": "jacobi"}, "preconditioner must be one of"),
        ({"preconditioner": "kfac", "precondition_rank": 8}, "does not use"),
    ],
)
def test_bad_solver_options_raise(regression_1d, kw, match):
    model, X, y = regression_1d
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        Laplace(model, "regression", "all", "hfl", **kw)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("bias", [True, False])
def test_last_layer_covariance_without_jacobians(classification, bias):
    """Last-layer dense predictions contract Sigma with the features
    (``B P^2`` work, no Jacobian; was ``B C P^2`` through ``J Sigma``): the full
    ``C x C`` covariances equal the Jacobian route (``functional_covariance``
    path, 1e-12) and FullLLLaplace (CurvlinopsGGN, <= FULL_TOL)."""
    import copy

    from torch import nn

    model, X, y = classification
    model = copy.deepcopy(model)
    if not bias:
        last = model[-1]
        new = nn.Linear(last.in_features, last.out_features, bias=False).to(DT)
        with torch.no_grad():
            new.weight.copy_(last.weight)
        model[-1] = new
    Xq = X[:7] * 1.1
    la = _hfl(model, X, y, "classification", "last_layer")
    f_mu, f_var = la.glm_predictive(Xq)
    assert la.last_diagnostics.solver == "dense"
    assert la.last_diagnostics.converged.all()
    # the Jacobian route of the same estimator
    with torch.no_grad():
        _, phi = la.model.forward_with_features(Xq)
    params = dict(la.model.last_layer.named_parameters())

    def f(*flat):
        return torch.func.functional_call(
            la.model.last_layer, dict(zip(params, flat)), (phi,)
        )

    jac = torch.func.jacrev(f, argnums=tuple(range(len(params))))(*params.values())
    Js = torch.cat([j.reshape(len(Xq), j.shape[1], -1) for j in jac], -1)
    via_jacobians = la.functional_variance(Js)
    torch.testing.assert_close(f_var, via_jacobians, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(f_mu, model(Xq), rtol=1e-12, atol=1e-12)
    full = Laplace(
        model, "classification", "last_layer", "full", prior_precision=PRIOR,
        backend=CurvlinopsGGN,
    )  # fmt: skip
    full.fit(loader(X, y))
    _, ref = reference_glm_predictive(full, Xq)
    assert rel_err(f_var, ref).max() <= FULL_TOL


def test_last_layer_fast_path_follows_hyperparameters(classification, monkeypatch):
    """The last-layer predictive reuses its factor without building the
    objective while the prior is unchanged, forms a new one when the prior
    changes (== FullLLLaplace at the new prior, <= FULL_TOL), and refuses a
    prior edited in place to NaN instead of reusing the old factor."""
    model, X, y = classification
    Xq = X[:5] * 1.1
    la = _hfl(model, X, y, "classification", "last_layer")
    la.glm_predictive(Xq)
    built = []  # objectives built (the estimator builds them in base)
    original = base.LaplaceObjective
    monkeypatch.setattr(
        base, "LaplaceObjective", lambda **kw: built.append(1) or original(**kw)
    )
    la.glm_predictive(Xq)
    assert built == []  # cached factor, current hyperparameters
    la.prior_precision = 7.0
    _, f_var = la.glm_predictive(Xq)
    assert built == [1]
    full = Laplace(
        model, "classification", "last_layer", "full", prior_precision=7.0,
        backend=CurvlinopsGGN,
    )  # fmt: skip
    full.fit(loader(X, y))
    _, ref = reference_glm_predictive(full, Xq)
    assert rel_err(f_var, ref).max() <= FULL_TOL
    with torch.no_grad():
        la.prior_precision.fill_(float("nan"))
    with pytest.raises(ValueError, match="prior"):
        la.glm_predictive(Xq)


def test_dense_budget_from_free_memory_with_a_user_cap(monkeypatch):
    """The budget is half the free memory in the tensor's dtype, capped by
    ``DENSE_BUDGET`` when the user sets it; unknown memory falls back to the
    fixed chunk budget."""
    from laplace_hfl.engine import device_memory

    like = torch.zeros(1, dtype=torch.float32)
    monkeypatch.setattr(dense, "available_bytes", lambda device: 8 * 2**30)
    monkeypatch.setattr(dense, "DENSE_BUDGET", None)
    assert dense.dense_budget(like) == 2**30  # 4 GiB of 4-byte entries
    assert dense.dense_fits(2**14, like=like)  # 4 P^2 = 2^30
    assert not dense.dense_fits(2**14 + 1, like=like)
    monkeypatch.setattr(dense, "DENSE_BUDGET", 1000)
    assert dense.dense_budget(like) == 1000
    monkeypatch.setattr(dense, "available_bytes", lambda device: None)
    monkeypatch.setattr(dense, "DENSE_BUDGET", None)
    assert dense.dense_budget(like) == dense.CHUNK_BUDGET
    free = device_memory.available_bytes("cpu")
    assert free is None or free > 0
