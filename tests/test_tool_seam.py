"""The public seam tools build on (``objective``, ``query_inputs``,
``glm_predictive``, ``refit_preconditioner``, ``preconditioner_sketch``,
``amortized_samples``): float64 against dense torch.func references."""

from __future__ import annotations

import pytest
import torch
from conftest import PRIOR, SIGMA, assert_unchanged, dense_reference, loader, snapshot
from laplace import Laplace
from torch.func import functional_call, jacrev

from laplace_hfl.engine.functional import ggn_matvec
from laplace_hfl.errors import HFLNotFittedError

DT = torch.float64
TOL = 1e-6  # exact HFL at rtol 1e-9 in float64


def _hfl(model, X, y, likelihood, **kw):
    la = Laplace(
        model, likelihood, "all", "hfl", sigma_noise=SIGMA if likelihood ==
        "regression" else 1.0, prior_precision=PRIOR, target="ggn", rtol=1e-9, **kw,
    )  # fmt: skip
    la.fit(loader(X, y))
    return la


def test_objective_is_the_posterior_precision(regression_1d):
    """``objective()`` with ``ggn_matvec`` reproduces ``GGN / sigma^2 + prior``."""
    model, X, y = regression_1d
    la = _hfl(model, X, y, "regression")
    obj = la.objective()
    P = obj.theta_map.numel()
    A = ggn_matvec(obj, torch.eye(P, dtype=DT))
    J = _jacobian(model, X)  # independent of the estimator's forward
    ref = J.T @ J / SIGMA**2 + PRIOR * torch.eye(P, dtype=DT)
    assert torch.allclose(A, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(obj.theta_map, la.mean.detach())
    la.prior_precision = 2 * PRIOR  # a new objective follows the prior
    assert torch.allclose(
        la.objective().prior_precision, torch.full((P,), 2 * PRIOR, dtype=DT)
    )


def _jacobian(model, X):
    """``(N C, P)`` Jacobian of the outputs by torch.func, parameters in order."""
    names = [n for n, _ in model.named_parameters()]
    base = {n: p.detach() for n, p in model.named_parameters()}
    theta = torch.cat([base[n].flatten() for n in names])
    sizes = [base[n].numel() for n in names]

    def f(th):
        chunks = torch.split(th, sizes)
        ps = {n: c.reshape(base[n].shape) for n, c in zip(names, chunks)}
        return functional_call(model, ps, (X,))

    return jacrev(f)(theta).reshape(-1, theta.numel())


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_glm_predictive_matches_dense_reference(likelihood, regression_multi,
                                                classification):  # fmt: skip
    model, X, y = regression_multi if likelihood == "regression" else classification
    snap = snapshot(model)
    la = _hfl(model, X, y, likelihood, solver="cg")
    Xq = X[:5]
    f_mu, f_var = la.glm_predictive(Xq)
    ref, ref_joint = dense_reference(model, X, y, Xq, likelihood, "ggn")
    assert torch.allclose(f_var, ref, rtol=TOL, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(f_mu, model(Xq))
    _, joint = la.glm_predictive(Xq, joint=True)
    assert torch.allclose(joint, ref_joint, rtol=TOL, atol=1e-9)
    _, diag = la.glm_predictive(Xq, diagonal_output=True)
    assert torch.allclose(diag, ref.diagonal(0, 1, 2), rtol=TOL, atol=1e-9)
    assert_unchanged(model, snap)


def test_last_layer_query_inputs_are_features(regression_multi):
    model, X, y = regression_multi
    la = Laplace(model, "regression", "last_layer", "hfl", sigma_noise=SIGMA,
                 prior_precision=PRIOR)  # fmt: skip
    la.fit(loader(X, y))
    feats = la.query_inputs(X[:4])
    with torch.no_grad():
        body = torch.nn.Sequential(*list(model.children())[:-1])
        assert torch.allclose(feats, body(X[:4]))
    obj = la.objective()
    with torch.no_grad():
        assert torch.allclose(obj.forward(obj.theta_map, feats), model(X[:4]))


def test_refit_preconditioner_applies_an_spd_inverse(regression_1d):
    """The Nyström preconditioner, rebuilt on request, maps ``A`` near ``I``."""
    model, X, y = regression_1d
    la = _hfl(model, X, y, "regression", solver="cg", preconditioner="nystrom",
              precondition_rank=8)  # fmt: skip
    name, apply = la.refit_preconditioner()
    assert name == "nystrom"
    sketch = la.preconditioner_sketch
    assert sketch is not None and 0 < sketch.U.shape[1] <= 8
    obj = la.objective()
    P = obj.theta_map.numel()
    M = apply(torch.eye(P, dtype=DT))
    assert torch.allclose(M, M.T, atol=1e-10)
    assert torch.linalg.eigvalsh(M).min() > 0
    _, again = la.refit_preconditioner(rebuild=True)
    assert la.preconditioner_sketch is not sketch  # built anew
    assert torch.allclose(again(torch.eye(P, dtype=DT)), M, atol=1e-10)
    la.preconditioner = "none"
    assert la.refit_preconditioner() == ("none", None)


def test_amortized_samples_follow_the_posterior(regression_1d):
    model, X, y = regression_1d
    la = _hfl(model, X, y, "regression", amortize=512)
    state = la.amortized_samples()
    assert state.samples.shape == (512, la.n_params)
    assert state.residual.shape == (512,) and state.iterations.shape == (512,)
    assert state is la.amortized_samples()  # cached for these hyperparameters
    cov = state.samples.T @ state.samples / 512
    ref = torch.linalg.inv(la.objective().prior_precision.diag() + _ggn(la))
    # Monte Carlo: relative error of the diagonal ~ sqrt(2 / S) = 0.06
    assert ((cov.diagonal() - ref.diagonal()).abs() / ref.diagonal()).max() < 0.3


def _ggn(la):
    obj = la.objective()
    P = obj.theta_map.numel()
    return ggn_matvec(obj, torch.eye(P, dtype=DT)) - obj.prior_precision.diag()


def test_seam_refuses_before_fit_and_outside_amortised_mode(regression_1d):
    model, X, y = regression_1d
    la = Laplace(model, "regression", "all", "hfl")
    with pytest.raises(HFLNotFittedError):
        la.objective()
    with pytest.raises(HFLNotFittedError):
        la.query_inputs(X)
    la.fit(loader(X, y))
    with pytest.raises(ValueError, match="amortize=S"):
        la.amortized_samples()
