"""Every estimator path on the model's device.

Each path is fitted and queried with the model, data and queries on
``device`` and compared, back on the CPU, with the independent float64
``torch.func`` reference of ``J P^{-1} J^T`` (``conftest.dense_reference``).
The CUDA cases are skipped where no CUDA device is present (CI); a session
with a GPU runs them with ``python -m pytest -q tests/test_device.py``.

Float64 throughout, so TF32 (cuDNN's default on Ampere and later) cannot
blur the comparison. Tolerances: exact paths 1e-5 relative on the diagonal
(the CG refits stop at their default ``rtol``); the amortised path 15%
(Monte Carlo with 2,000 samples: sqrt(2 / 2000) = 3% standard deviation).
The random draws (Nyström test matrix, example noise) come from CPU
generators and are copied to the device, so a CUDA run draws the same
numbers as a CPU run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DT, PRIOR, assert_unchanged, dense_reference, loader
from conftest import snapshot as snap_model
from laplace import Laplace

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device"
        ),
    ),
]

#: name -> (subset_of_weights, HFL options, reference kind, relative tolerance)
PATHS = {
    "dense": ("all", {"solver": "dense"}, "ggn", 1e-5),
    "cg": ("all", {"solver": "cg", "preconditioner": "none"}, "ggn", 1e-5),
    "cg_kfac": ("all", {"solver": "cg", "preconditioner": "kfac"}, "ggn", 1e-5),
    "cg_nystrom": (
        "all",
        {"solver": "cg", "preconditioner": "nystrom", "precondition_rank": 12},
        "ggn",
        1e-5,
    ),
    "hessian": ("all", {"solver": "cg", "target": "hessian"}, "hessian", 1e-5),
    "last_layer": ("last_layer", {}, "ggn", 1e-5),
    "amortized": ("all", {"amortize": 2000}, "ggn", 0.15),
}


def _on(device, model, X, y):
    return model.to(device), X.to(device), y.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", list(PATHS))
def test_path_on_device_matches_dense_reference(classification, path, device):
    """Classification: the loss Hessian depends on the outputs, the harder
    case for the GGN products; regression paths are covered on the CPU by
    test_accuracy and test_dense."""
    model, X, y = classification
    likelihood = "classification"
    subset, options, kind, tol = PATHS[path]
    Xq = X[:6] * 1.1
    ref, _ = dense_reference(
        model, X, y, Xq, likelihood, kind, last_layer=subset == "last_layer"
    )
    model, X, y = _on(device, model, X, y)
    before = snap_model(model)
    la = Laplace(model, likelihood, subset, "hfl", prior_precision=PRIOR, **options)
    la.fit(loader(X, y))
    f_mu, f_var = la.glm_predictive(Xq.to(device))
    assert f_mu.device.type == device and f_var.device.type == device
    assert f_var.dtype == DT
    est = torch.diagonal(f_var.cpu(), dim1=-2, dim2=-1)
    want = torch.diagonal(ref, dim1=-2, dim2=-1)
    err = ((est - want).abs() / want).max().item()
    assert err <= tol, f"{path} on {device}: max relative error {err:.2e}"
    with torch.no_grad():
        torch.testing.assert_close(f_mu.cpu(), model(Xq.to(device)).cpu())
    assert_unchanged(model, before)


@pytest.mark.parametrize("device", DEVICES)
def test_link_approximations_and_samples_on_device(classification, device):
    """The classification predictive (probit, bridge, MC) and predictive
    samples stay on the model's device and are probabilities."""
    model, X, y = _on(device, *classification)
    la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR)
    la.fit(loader(X, y))
    Xq = X[:4]
    for link in ("probit", "bridge", "mc"):
        p = la(Xq, link_approx=link, n_samples=64)
        assert p.device.type == device
        torch.testing.assert_close(p.sum(-1).cpu(), torch.ones(4, dtype=DT))
    s = la.predictive_samples(Xq, n_samples=8)
    assert s.device.type == device and s.shape == (8, 4, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_prior_tuning_on_device(classification, device):
    """laplace-torch's default marginal-likelihood tuning and the grid
    search run on the model's device and give the CPU's answer (float64;
    the probe vectors come from CPU generators)."""
    results = {}
    for where in dict.fromkeys(["cpu", device]):
        model, X, y = _on(where, *classification)
        la = Laplace(model, "classification", "all", "hfl", prior_precision=PRIOR)
        la.fit(loader(X, y))
        la.optimize_prior_precision(n_steps=20)
        marglik = la.prior_precision.detach()
        la.optimize_prior_precision(
            method="gridsearch", val_loader=loader(X[:20], y[:20]),
            grid_size=5, log_prior_prec_min=-2, log_prior_prec_max=2,
        )  # fmt: skip
        grid = la.prior_precision.detach()
        assert marglik.device.type == where and grid.device.type == where
        assert torch.isfinite(marglik).all() and (marglik > 0).all()
        results[where] = (marglik.cpu(), grid.cpu())
    torch.testing.assert_close(results[device], results["cpu"], rtol=1e-6, atol=0)
