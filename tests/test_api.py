"""The laplace-torch surface on top of HFL, checked against FullLaplace (GGN)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DT, PRIOR, SIGMA, dense_reference, loader, rel_err
from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader

TOL = 1e-3  # relative, against FullLaplace with the matching GGN backend


def pair(model, X, y, likelihood, subset="all", **kw):
    extra = {"sigma_noise": SIGMA} if likelihood == "regression" else {}
    hfl = Laplace(
        model, likelihood, subset, "hfl", prior_precision=PRIOR, **extra, **kw
    )
    hfl.fit(loader(X, y))
    ref = Laplace(
        copy.deepcopy(model), likelihood, subset, "full", backend=CurvlinopsGGN,
        prior_precision=PRIOR, **extra,
    )  # fmt: skip
    ref.fit(loader(X, y))
    return hfl, ref


@pytest.mark.parametrize("link", ["probit", "bridge", "bridge_norm"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_deterministic_links_match_full(classification, link, subset):
    model, X, y = classification
    hfl, ref = pair(model, X, y, "classification", subset)
    Xq = X[:6] * 1.5
    p, q = hfl(Xq, link_approx=link), ref(Xq, link_approx=link)
    assert torch.allclose(p.sum(-1), torch.ones(6, dtype=DT))
    assert rel_err(p, q).max() <= TOL


def test_mc_link_and_samples(classification):
    model, X, y = classification
    hfl, ref = pair(model, X, y, "classification")
    Xq = X[:4]
    g1 = torch.Generator().manual_seed(0)
    g2 = torch.Generator().manual_seed(0)
    s1 = hfl.predictive_samples(Xq, n_samples=2000, generator=g1)
    s2 = ref.predictive_samples(Xq, n_samples=2000, generator=g2)
    assert s1.shape == (2000, 4, 3)
    assert torch.allclose(s1.sum(-1), torch.ones(2000, 4, dtype=DT))
    # same generator and (to 1e-3) the same covariance: nearly the same samples
    assert (s1 - s2).abs().max() < 1e-2
    probs = hfl(Xq, link_approx="mc", n_samples=500)
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=DT))
    f = hfl.functional_samples(Xq, n_samples=3000, generator=g1)
    f_mu, f_var = hfl.glm_predictive(Xq)
    assert torch.allclose(
        f.mean(0), f_mu, atol=4 * f_var.diagonal(0, 1, 2).sqrt().max() / 50
    )


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_regression_outputs_match_full(regression_multi, subset):
    model, X, y = regression_multi
    hfl, ref = pair(model, X, y, "regression", subset)
    Xq = X[:5] + 0.2
    mu, var = hfl(Xq)
    mu_r, var_r = ref(Xq)
    assert var.shape == (5, 3, 3) and torch.allclose(mu, mu_r)
    d = torch.diagonal(var_r, 0, 1, 2).sqrt()
    assert ((var - var_r).abs() / (d[:, :, None] * d[:, None, :])).max() <= TOL
    _, var_d = hfl(Xq, diagonal_output=True)
    assert var_d.shape == (5, 3)
    assert torch.allclose(var_d, torch.diagonal(var, 0, 1, 2))


def test_prior_and_noise_changes_invalidate_cache(regression_1d):
    model, X, y = regression_1d
    hfl, ref = pair(model, X, y, "regression")
    Xq = X[:5]
    for prior, sigma in [
        (2.0, SIGMA),
        (2.0, 0.7),
        (torch.tensor([0.1, 1.0, 2.0, 3.0]), 0.7),
    ]:
        hfl.prior_precision, ref.prior_precision = prior, prior
        hfl.sigma_noise, ref.sigma_noise = sigma, sigma
        v, v_r = hfl(Xq)[1], ref(Xq)[1]
        assert rel_err(v, v_r).max() <= TOL


def test_temperature_change_invalidates_cache(regression_1d):
    model, X, y = regression_1d
    hfl, ref = pair(model, X, y, "regression")
    hfl(X[:2])
    hfl.temperature = ref.temperature = 4.0
    assert rel_err(hfl(X[:3])[1], ref(X[:3])[1]).max() <= TOL


def test_gridsearch_agrees_with_full(regression_1d):
    model, X, y = regression_1d
    hfl, ref = pair(model, X, y, "regression")
    val = loader(X[::3] + 0.05, y[::3])
    kw = {"method": "gridsearch", "val_loader": val, "grid_size": 5,
          "log_prior_prec_min": -2, "log_prior_prec_max": 2}  # fmt: skip
    hfl.optimize_prior_precision(**kw)
    ref.optimize_prior_precision(**kw)
    assert torch.allclose(hfl.prior_precision, ref.prior_precision)


class DictModel(nn.Module):
    """Hugging Face-style model: takes the whole batch dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, batch):
        return self.head(self.body(batch["input_ids"]))


class DictData(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"input_ids": self.X[i], "labels": self.y[i]}


def test_dict_batches(classification):
    _, X, y = classification
    torch.manual_seed(1)
    model = DictModel().to(DT)
    dl = DataLoader(DictData(X, y), batch_size=16)
    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR)
    la.fit(dl)
    plain = nn.Sequential(model.body, model.head)
    q = {"input_ids": X[:4]}
    _, f_var = la.glm_predictive(q)
    ref, _ = dense_reference(plain, X, y, X[:4], "classification", "ggn")
    assert rel_err(f_var.diagonal(0, 1, 2), ref.diagonal(0, 1, 2)).max() <= TOL
    la_ll = Laplace(model, "classification", "last_layer", "hfl", prior_precision=PRIOR)
    la_ll.fit(dl)
    _, v_ll = la_ll.glm_predictive(q)
    ref_ll, _ = dense_reference(plain, X, y, X[:4], "classification", "ggn", True)
    assert rel_err(v_ll.diagonal(0, 1, 2), ref_ll.diagonal(0, 1, 2)).max() <= TOL


def test_frozen_parameters_are_not_refit(regression_1d):
    """Only requires_grad=True parameters are refit (LoRA-like subsets)."""
    model, X, y = regression_1d
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    la = Laplace(
        model, "regression", "all", "hfl", sigma_noise=SIGMA, prior_precision=PRIOR
    )
    la.fit(loader(X, y))
    assert la.n_params == sum(p.numel() for p in model[2].parameters())
    Xq = X[:5]
    _, v = la(Xq)
    ref, _ = dense_reference(model, X, y, Xq, "regression", "ggn", last_layer=True)
    assert rel_err(v, ref).max() <= TOL


def test_uncached_loader_gives_same_answer(regression_1d):
    model, X, y = regression_1d
    a = Laplace(model, "regression", "all", "hfl", sigma_noise=SIGMA)
    a.fit(loader(X, y))
    b = Laplace(model, "regression", "all", "hfl", sigma_noise=SIGMA)
    b.fit(loader(X, y), cache_data=False)
    assert torch.allclose(a(X[:3])[1], b(X[:3])[1], rtol=1e-6)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_enable_backprop_gradients_match_full(regression_1d, subset):
    """d f_var / d x through HFL equals FullLaplace's autograd gradient."""
    model, X, y = regression_1d
    hfl, _ = pair(model, X, y, "regression", subset, enable_backprop=True)
    ref = Laplace(
        copy.deepcopy(model), "regression", subset, "full", backend=CurvlinopsGGN,
        prior_precision=PRIOR, sigma_noise=SIGMA, enable_backprop=True,
    )  # fmt: skip
    ref.fit(loader(X, y))
    grads = []
    for la in (hfl, ref):
        x = torch.linspace(-1.5, 1.5, 4, dtype=DT)[:, None].requires_grad_(True)
        f_mu, f_var = la(x)
        (f_var.sum() + f_mu.sum()).backward()
        grads.append(x.grad)
    assert rel_err(grads[0], grads[1]).max() <= 1e-3
