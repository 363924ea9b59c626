"""Tests for Hessian-free Laplace, ``hessian_structure="hfl"``.

Every estimate is compared with a dense float64 reference on tiny tanh MLPs
whose MAP is a stationary point of the Laplace objective (LBFGS on the summed
loss plus the prior).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import (
    FullLaplace,
    FullLLLaplace,
    HessianFreeLaplace,
    HessianFreeLLLaplace,
    HessianStructure,
    Laplace,
)
from laplace.curvature import CurvlinopsGGN, CurvlinopsHessian

SIGMA_NOISE = 0.3
PRIOR_PRECISION = 0.5
DTYPE = torch.float64


def train_map(model, X, y, likelihood, sigma_noise=1.0, prior_precision=1.0):
    """Minimise the Laplace objective (summed loss + prior) to stationarity."""
    params = list(model.parameters())
    opt = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=300,
        tolerance_grad=1e-12,
        tolerance_change=1e-16,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        f = model(X)
        if likelihood == "regression":
            data = 0.5 * (f - y).square().sum() / sigma_noise**2
        else:
            data = nn.functional.cross_entropy(f, y, reduction="sum")
        prior = 0.5 * prior_precision * sum(p.square().sum() for p in params)
        loss = data + prior
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    model.zero_grad(set_to_none=True)
    return model


def median_rel_err(estimate, reference):
    return float(((estimate - reference).abs() / reference.abs()).median())


@pytest.fixture(scope="module")
def reg_data():
    gen = torch.Generator().manual_seed(711)
    X = torch.rand(40, 1, generator=gen, dtype=DTYPE) * 8 - 4
    y = torch.sin(X) + 0.1 * torch.randn(40, 1, generator=gen, dtype=DTYPE)
    return X, y


@pytest.fixture(scope="module")
def reg_loader(reg_data):
    return DataLoader(TensorDataset(*reg_data), batch_size=20)


@pytest.fixture(scope="module")
def reg_model(reg_data):
    torch.manual_seed(711)
    model = nn.Sequential(nn.Linear(1, 10), nn.Tanh(), nn.Linear(10, 1)).to(DTYPE)
    return train_map(model, *reg_data, "regression", SIGMA_NOISE, PRIOR_PRECISION)


@pytest.fixture(scope="module")
def cls_data():
    gen = torch.Generator().manual_seed(711)
    X = torch.randn(45, 2, generator=gen, dtype=DTYPE)
    y = (torch.atan2(X[:, 1], X[:, 0]) + torch.pi).mul(3 / (2 * torch.pi)).long()
    return X, y.clamp(max=2)


@pytest.fixture(scope="module")
def cls_loader(cls_data):
    return DataLoader(TensorDataset(*cls_data), batch_size=15)


@pytest.fixture(scope="module")
def cls_model(cls_data):
    torch.manual_seed(711)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    return train_map(model, *cls_data, "classification", 1.0, PRIOR_PRECISION)


@pytest.fixture
def X_test():
    return torch.linspace(-6, 6, 13, dtype=DTYPE).unsqueeze(-1)


def fit_reference(cls, model, loader, likelihood, backend, sigma_noise=1.0):
    la = cls(
        copy.deepcopy(model),
        likelihood,
        sigma_noise=sigma_noise,
        prior_precision=PRIOR_PRECISION,
        backend=backend,
    )
    la.fit(loader)
    return la


def test_hessian_structure_enum():
    assert HessianStructure.HFL == "hfl"
    assert HessianStructure("hfl") is HessianStructure.HFL


@pytest.mark.parametrize("structure", [HessianStructure.HFL, "hfl"])
@pytest.mark.parametrize(
    "subset, cls",
    [("all", HessianFreeLaplace), ("last_layer", HessianFreeLLLaplace)],
)
def test_laplace_factory(reg_model, structure, subset, cls):
    la = Laplace(reg_model, "regression", subset, structure)
    assert type(la) is cls


def test_subnetwork_rejected(reg_model):
    with pytest.raises(ValueError):
        Laplace(reg_model, "regression", "subnetwork", "hfl")


def test_ggn_target_matches_full_laplace(reg_model, reg_loader, X_test):
    ref = fit_reference(
        FullLaplace, reg_model, reg_loader, "regression", CurvlinopsGGN, SIGMA_NOISE
    )
    f_mu_ref, f_var_ref = ref(X_test)
    la = Laplace(
        reg_model,
        "regression",
        "all",
        HessianStructure.HFL,
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
    )
    la.fit(reg_loader)
    f_mu, f_var = la(X_test)
    assert f_var.shape == f_var_ref.shape == (13, 1, 1)
    torch.testing.assert_close(f_mu, f_mu_ref)
    assert median_rel_err(f_var, f_var_ref) <= 1e-3


def test_hessian_target_matches_exact_hessian(reg_model, reg_loader, X_test):
    ref = fit_reference(
        FullLaplace,
        reg_model,
        reg_loader,
        "regression",
        CurvlinopsHessian,
        SIGMA_NOISE,
    )
    _, f_var_ref = ref(X_test)
    la = HessianFreeLaplace(
        reg_model,
        "regression",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
        target="hessian",
    )
    la.fit(reg_loader)
    _, f_var = la(X_test)
    assert median_rel_err(f_var, f_var_ref) <= 1e-3


def test_joint_covariance(reg_model, reg_loader, X_test):
    ref = fit_reference(
        FullLaplace, reg_model, reg_loader, "regression", CurvlinopsGGN, SIGMA_NOISE
    )
    _, cov_ref = ref(X_test[:5], joint=True)
    la = HessianFreeLaplace(
        reg_model,
        "regression",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
    )
    la.fit(reg_loader)
    _, cov = la(X_test[:5], joint=True)
    assert cov.shape == cov_ref.shape == (5, 5)
    scale = torch.diagonal(cov_ref).max()
    assert float((cov - cov_ref).abs().max() / scale) <= 1e-3


def test_last_layer_matches_full_ll_laplace(reg_model, reg_loader, X_test):
    ref = fit_reference(
        FullLLLaplace, reg_model, reg_loader, "regression", CurvlinopsGGN, SIGMA_NOISE
    )
    _, f_var_ref = ref(X_test)
    la = Laplace(
        reg_model,
        "regression",
        "last_layer",
        "hfl",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
    )
    la.fit(reg_loader)
    _, f_var = la(X_test)
    assert median_rel_err(f_var, f_var_ref) <= 1e-3


def test_classification_matches_full_laplace(cls_model, cls_loader, cls_data):
    X = cls_data[0][:8]
    ref = fit_reference(
        FullLaplace, cls_model, cls_loader, "classification", CurvlinopsGGN
    )
    _, f_var_ref = ref._glm_predictive_distribution(X)
    la = Laplace(
        cls_model,
        "classification",
        "all",
        "hfl",
        prior_precision=PRIOR_PRECISION,
    )
    la.fit(cls_loader)
    _, f_var = la._glm_predictive_distribution(X)
    assert f_var.shape == f_var_ref.shape == (8, 3, 3)
    err = torch.linalg.matrix_norm(f_var - f_var_ref) / torch.linalg.matrix_norm(
        f_var_ref
    )
    assert float(err.median()) <= 1e-3
    probs = la(X, link_approx="probit")
    torch.testing.assert_close(probs, ref(X, link_approx="probit"), atol=1e-4, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, dtype=DTYPE))


def test_float32_model(reg_model, reg_loader, X_test):
    ref = fit_reference(
        FullLaplace, reg_model, reg_loader, "regression", CurvlinopsGGN, SIGMA_NOISE
    )
    _, f_var_ref = ref(X_test)
    X, y = reg_loader.dataset.tensors
    loader32 = DataLoader(TensorDataset(X.float(), y.float()), batch_size=20)
    la = HessianFreeLaplace(
        copy.deepcopy(reg_model).float(),
        "regression",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
    )
    la.fit(loader32)
    _, f_var = la(X_test.float())
    assert f_var.dtype == torch.float32
    assert median_rel_err(f_var.double(), f_var_ref) <= 1e-3


def test_model_left_unchanged(reg_model, reg_loader, X_test):
    model = copy.deepcopy(reg_model).train()
    before = copy.deepcopy(model.state_dict())
    la = HessianFreeLaplace(
        model,
        "regression",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
        target="hessian",
    )
    la.fit(reg_loader)
    la(X_test[:3])
    assert model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert all(p.grad is None for p in model.parameters())


def test_marginal_likelihood_without_a_matrix(reg_model, reg_loader):
    """Matrix-free log marginal likelihood equals FullLaplace's; marglik tuning runs."""
    la = HessianFreeLaplace(
        reg_model,
        "regression",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
    )
    la.fit(reg_loader)
    ref = fit_reference(
        FullLaplace, reg_model, reg_loader, "regression", CurvlinopsGGN, SIGMA_NOISE
    )
    lml, lml_ref = la.log_marginal_likelihood(), ref.log_marginal_likelihood()
    assert torch.allclose(lml, lml_ref.to(lml.dtype), rtol=1e-4)
    la.optimize_prior_precision(method="marglik", n_steps=20)
    assert torch.isfinite(la.prior_precision).all()


def test_weight_space_without_a_matrix(reg_model, reg_loader, X_test):
    """Matrix-free posterior precision, exact weight samples, nn predictive."""
    la = HessianFreeLaplace(
        reg_model,
        "regression",
        sigma_noise=SIGMA_NOISE,
        prior_precision=PRIOR_PRECISION,
        chunk_size=4096,
    )
    la.fit(reg_loader)
    ref = fit_reference(
        FullLaplace, reg_model, reg_loader, "regression", CurvlinopsGGN, SIGMA_NOISE
    )
    V = torch.randn(la.n_params, 3, generator=torch.Generator().manual_seed(0))
    V = V.to(DTYPE)
    P, P_ref = la.posterior_precision, ref.posterior_precision
    assert P.shape == P_ref.shape and P.dtype == P_ref.dtype
    assert torch.allclose(P @ V, P_ref @ V, rtol=1e-6, atol=1e-6)
    assert la.H is not None and la.H.shape == ref.H.shape
    draws = la.sample(4096, generator=torch.Generator().manual_seed(0))
    Sigma = ref.posterior_covariance
    err = float((torch.cov(draws.T) - Sigma).norm() / Sigma.norm())
    # RMS error of any exact sampler at 4096 draws (Wishart).
    fro2 = Sigma.square().sum()
    floor = float(((fro2 + Sigma.trace() ** 2) / 4096 / fro2).sqrt())
    assert err < max(0.05, 1.25 * floor)
    f_mu, f_var = la(X_test, pred_type="nn", link_approx="mc", n_samples=50)
    assert f_mu.shape == f_var.shape == (len(X_test), 1)
    assert (f_var > 0).all()
    with pytest.raises(NotImplementedError):
        la(X_test, pred_type="gp")


def test_gridsearch_prior_precision(reg_model, reg_loader):
    la = HessianFreeLaplace(reg_model, "regression", sigma_noise=SIGMA_NOISE)
    la.fit(reg_loader)
    la.optimize_prior_precision(
        method="gridsearch",
        val_loader=reg_loader,
        grid_size=3,
        log_prior_prec_min=-1,
        log_prior_prec_max=1,
    )
    assert any(float(la.prior_precision) == pytest.approx(v) for v in (0.1, 1, 10))


def test_predict_before_fit_raises(reg_model, X_test):
    la = HessianFreeLaplace(reg_model, "regression")
    with pytest.raises(RuntimeError, match="fit"):
        la(X_test)
