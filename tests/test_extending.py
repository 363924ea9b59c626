"""Extending the estimator: a solver, a preconditioner or a curvature is one
class plus one registry entry (``laplace_hfl.engine.solver_objects.SOLVERS``,
``laplace_hfl.engine.precond_objects.PRECONDITIONERS``,
``laplace_hfl.engine.curvature.CURVATURES``).

The toy solver below (a plain ``torch.linalg.solve`` on the dense posterior
precision) is defined and registered here only, and runs through the accuracy
matrix against the independent float64 ``torch.func`` reference of
``J P^-1 J^T`` (``conftest.dense_reference``), on the CPU and, where present,
on CUDA; a toy preconditioner (``diag(p_0)``) is registered the same way. The
unit tests check the objects' caches: a solver's cache is rebuilt
exactly when the hyperparameter key changes, a preconditioner's data part is
built once per fit.
"""

from __future__ import annotations

import conftest as common
import pytest
import torch
from laplace import Laplace

import laplace_hfl.engine.precond_objects as precond_objects
import laplace_hfl.engine.solver_objects as solver_objects
from laplace_hfl.engine.curvature import CURVATURES, curvature_of
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    ParamLayout,
    make_forward,
)
from laplace_hfl.engine.precond_objects import (
    PRECONDITIONERS,
    PreconditionerMethod,
    PrecondSetup,
)
from laplace_hfl.engine.preconditioner import Preconditioner
from laplace_hfl.engine.refit import RefitDiagnostics, RefitSettings
from laplace_hfl.engine.solver_objects import (
    SOLVERS,
    CGRefits,
    SolveContext,
    Solver,
)

#: Relative tolerance of an exact dense solve against the reference.
EXACT_TOL = 1e-8


def _count_calls(monkeypatch, module, name: str) -> list:
    """Replaces ``module.name`` by a wrapper that records each call."""
    calls, real = [], getattr(module, name)

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(module, name, counted)
    return calls


# ------------------------------------------------------------ the toy solver
class LinalgSolve(Solver):
    """``torch.linalg.solve`` on ``h C + diag(p_0)``, ``C`` the dense data
    curvature at the MAP, formed once per hyperparameter key."""

    name = "linalg"
    builds = 0  # precision matrices formed (all instances)

    def solve(self, obj, V, ctx):
        def precision():
            type(self).builds += 1
            C = ctx.curvature.dense_data(obj, obj.theta_map, ctx.chunk_size)
            return obj.h_factor * C + torch.diag(obj.prior_precision)

        A = self.cached(ctx, "precision", precision)
        m = V.shape[0]
        diag = RefitDiagnostics(
            eps=V.new_zeros(m),
            residual=V.new_zeros(2, m),
            iterations=torch.zeros(2, m, dtype=torch.long, device=V.device),
            converged=torch.ones(2, m, dtype=torch.bool, device=V.device),
            solver=self.name,
            choice=ctx.choice(),
        )
        return torch.linalg.solve(A, V.T).T, diag


@pytest.fixture
def linalg(monkeypatch):
    """Registers the toy solver for one test (removed afterwards)."""
    monkeypatch.setitem(SOLVERS, LinalgSolve.name, LinalgSolve)
    monkeypatch.setattr(LinalgSolve, "builds", 0)
    return LinalgSolve.name


def _fit(model, X, y, likelihood, subset, **kw):
    la = Laplace(
        model, likelihood, subset, "hfl", prior_precision=common.PRIOR,
        sigma_noise=common.SIGMA if likelihood == "regression" else 1.0, **kw,
    )  # fmt: skip
    la.fit(common.loader(X, y))
    return la


@pytest.mark.parametrize("case", ["regression_multi", "classification"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("target", ["ggn", "hessian"])
def test_registered_solver_matches_dense_reference(
    linalg, case, subset, target, request
):
    model, X, y = request.getfixturevalue(case)
    likelihood = "classification" if case == "classification" else "regression"
    Xq = X[:5] * 1.1
    kind = "hessian" if target == "hessian" and subset == "all" else "ggn"
    ref, _ = common.dense_reference(
        model, X, y, Xq, likelihood, kind, last_layer=subset == "last_layer"
    )
    before = common.snapshot(model)
    la = _fit(model, X, y, likelihood, subset, solver=linalg, target=target)
    f_var = la.glm_predictive(Xq)[1]
    assert la.last_diagnostics.solver == linalg
    assert f_var.dtype == common.DT
    err = common.rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2)).max()
    assert err <= EXACT_TOL, f"max relative error {err:.2e}"
    assert LinalgSolve.builds == 1  # one precision for one prior
    common.assert_unchanged(model, before)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_registered_solver_on_device(linalg, classification, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, X, y = classification
    Xq = X[:4] * 1.1
    ref, _ = common.dense_reference(model, X, y, Xq, "classification", "ggn")
    model, X, y = model.to(device), X.to(device), y.to(device)
    la = _fit(model, X, y, "classification", "all", solver=linalg)
    f_mu, f_var = la.glm_predictive(Xq.to(device))
    assert f_mu.device.type == device and f_var.device.type == device
    est, want = f_var.cpu().diagonal(0, 1, 2), ref.diagonal(0, 1, 2)
    assert common.rel_err(est, want).max() <= EXACT_TOL


def test_unregistered_solver_is_refused(classification):
    model, _, _ = classification
    assert LinalgSolve.name not in SOLVERS  # the fixture removed it
    with pytest.raises(ValueError, match="solver must be one of"):
        Laplace(model, "classification", "all", "hfl", solver=LinalgSolve.name)


def test_solver_cache_rebuilt_exactly_when_the_key_changes(linalg, classification):
    model, X, y = classification
    la = _fit(model, X, y, "classification", "all", solver=linalg)
    la.glm_predictive(X[:2])
    la.glm_predictive(X[2:4])
    assert LinalgSolve.builds == 1  # same hyperparameters: reused
    la.prior_precision = 2 * common.PRIOR
    la.glm_predictive(X[:2])
    assert LinalgSolve.builds == 2  # new key: rebuilt
    la.glm_predictive(X[:2])
    assert LinalgSolve.builds == 2
    la.prior_precision = common.PRIOR  # back: the cache holds one key only
    la.glm_predictive(X[:2])
    assert LinalgSolve.builds == 3
    la.fit(common.loader(X, y))  # a new fit starts with a new object
    la.glm_predictive(X[:2])
    assert LinalgSolve.builds == 4


def test_cache_slots_share_one_key():
    settings = RefitSettings()
    solver, built = CGRefits(), []

    def build(tag):
        built.append(tag)
        return tag

    a, b = (
        SolveContext(key=(1.0,), settings=settings),
        SolveContext(key=(2.0,), settings=settings),
    )
    assert not solver.is_current(a)
    assert solver.cached(a, "x", lambda: build("xa")) == "xa"
    assert solver.cached(a, "y", lambda: build("ya")) == "ya"
    assert solver.cached(a, "x", lambda: build("again")) == "xa"
    assert solver.is_current(a) and not solver.is_current(b)
    assert solver.cached(b, "y", lambda: build("yb")) == "yb"
    assert solver.cached(b, "x", lambda: build("xb")) == "xb"  # dropped with a
    assert built == ["xa", "ya", "yb", "xb"]
    solver.reset()
    assert not solver.is_current(b)


def test_base_point_cached_per_key(classification, monkeypatch):
    model, X, y = classification
    calls = _count_calls(monkeypatch, solver_objects, "unperturbed_refit")
    la = _fit(model, X, y, "classification", "all", solver="cg")
    la.glm_predictive(X[:2])
    la.glm_predictive(X[2:4])
    assert len(calls) == 1
    la.prior_precision = common.PRIOR  # set again to the same value: same key
    la.glm_predictive(X[:2])
    assert len(calls) == 1
    la.prior_precision = 3 * common.PRIOR
    la.glm_predictive(X[:2])
    assert len(calls) == 2


def test_amortized_samples_drawn_once_per_key(regression_1d, monkeypatch):
    model, X, y = regression_1d
    calls = _count_calls(monkeypatch, solver_objects, "posterior_samples")
    la = _fit(model, X, y, "regression", "all", amortize=4)
    assert len(calls) == 1  # drawn at fit
    la.glm_predictive(X[:2])
    assert len(calls) == 1
    la.prior_precision = 2 * common.PRIOR
    la.glm_predictive(X[:2])
    assert len(calls) == 2


# ------------------------------------------------------------ preconditioners
@pytest.mark.parametrize("name", ["nystrom", "kfac"])
def test_preconditioner_data_built_once_per_fit(classification, monkeypatch, name):
    model, X, y = classification
    target = {"nystrom": "nystrom_sketch", "kfac": "kfac_factors"}[name]
    calls = _count_calls(monkeypatch, precond_objects, target)
    la = _fit(model, X, y, "classification", "all", solver="cg", preconditioner=name)
    la.glm_predictive(X[:2])
    assert la.last_diagnostics.preconditioner == name  # the object's own name
    la.prior_precision = 5 * common.PRIOR  # only apply() is redone
    la.glm_predictive(X[:2])
    assert len(calls) == 1
    la.fit(common.loader(X, y))
    la.glm_predictive(X[:2])
    assert len(calls) == 2


class PriorDiagonal(PreconditionerMethod):
    """Toy preconditioner ``M = diag(p_0)`` (no data part)."""

    name = "prior_diagonal"

    def apply(self, h_factor, prior_precision):
        return Preconditioner(lambda R: R / prior_precision)


def test_registered_preconditioner_is_used_and_exact(classification, monkeypatch):
    model, X, y = classification
    monkeypatch.setitem(PRECONDITIONERS, PriorDiagonal.name, PriorDiagonal)
    Xq = X[:4] * 1.1
    want, _ = common.dense_reference(model, X, y, Xq, "classification", "ggn")
    la = _fit(
        model, X, y, "classification", "all", solver="cg",
        preconditioner=PriorDiagonal.name, rtol=1e-9,
    )  # fmt: skip
    f_var = la.glm_predictive(Xq)[1]
    assert la.last_diagnostics.preconditioner == PriorDiagonal.name
    assert la.last_diagnostics.converged.all()
    err = common.rel_err(f_var.diagonal(0, 1, 2), want.diagonal(0, 1, 2)).max()
    assert err <= 1e-6


def _objective(model, X, y, likelihood):
    named = list(model.named_parameters())
    layout = ParamLayout(tuple(n for n, _ in named), tuple(p.shape for _, p in named))
    theta = torch.cat([p.detach().flatten() for _, p in named])
    h = 1 / common.SIGMA**2 if likelihood == "regression" else 1.0
    return LaplaceObjective(
        forward=make_forward(model, layout, {}),
        batches=lambda: [(X, y)],
        likelihood=likelihood,
        h_factor=h,
        prior_precision=torch.full_like(theta, common.PRIOR),
        prior_mean=torch.zeros((), dtype=theta.dtype),
        theta_map=theta,
    )


def test_preconditioner_objects_build_apply_and_availability(classification):
    model, X, y = classification
    obj = _objective(model, X, y, "classification")
    P = obj.theta_map.numel()
    named = list(model.named_parameters())
    layout = ParamLayout(tuple(n for n, _ in named), tuple(p.shape for _, p in named))
    setup = PrecondSetup(rank=8, chunk_size=4, refit_module=lambda: (model, layout, {}))
    assert list(PRECONDITIONERS) == ["nystrom", "kfac", "none"]  # probe order
    assert all(cls.available(setup) for cls in PRECONDITIONERS.values())
    assert not PRECONDITIONERS["nystrom"].available(
        PrecondSetup(0, 4, setup.refit_module)
    )
    nys = PRECONDITIONERS["nystrom"]()
    nys.build(obj, setup)
    sketch = nys.sketch
    nys.build(obj, setup)
    assert nys.sketch is sketch  # once
    nys.build(obj, PrecondSetup(4, 4, setup.refit_module))
    assert nys.sketch is not sketch and nys.rank == 4  # a new rank asked for
    R = torch.randn(3, P, dtype=common.DT, generator=torch.Generator().manual_seed(0))
    for name in ("nystrom", "kfac"):
        method = PRECONDITIONERS[name]()
        method.build(obj, setup)
        M = method.apply(obj.h_factor, obj.prior_precision)
        Z = M(R)
        assert Z.shape == R.shape and (R * Z).sum(1).gt(0).all()  # SPD
    assert PRECONDITIONERS["none"]().apply(1.0, obj.prior_precision) is None


# ------------------------------------------------------------------ curvature
@pytest.mark.parametrize("target", ["ggn", "hessian"])
def test_curvature_objects_products_match_their_dense_form(regression_1d, target):
    model, X, y = regression_1d
    obj = _objective(model, X, y, "regression")
    curvature = curvature_of(target)
    assert curvature is CURVATURES[target] is RefitSettings(target=target).curvature
    assert curvature.name == target
    assert curvature.gauss_newton == (target == "ggn")
    assert curvature.at_base_point == (target == "hessian")
    P = obj.theta_map.numel()
    V = torch.randn(3, P, dtype=common.DT, generator=torch.Generator().manual_seed(1))
    A = obj.h_factor * curvature.dense_data(obj, obj.theta_map) + torch.diag(
        obj.prior_precision
    )
    torch.testing.assert_close(
        curvature.precision_matvec(obj, V), V @ A, rtol=1e-10, atol=1e-10
    )


def test_unknown_target_names_the_registered_ones():
    with pytest.raises(ValueError, match="Unknown HFL target"):
        RefitSettings(target="fisher")
