"""A float32 model still gets accurate variances (refits run in float64)."""

from __future__ import annotations

import copy

import torch
from conftest import DT, PRIOR, SIGMA, dense_reference, loader, rel_err
from laplace import Laplace


def test_float32_model_matches_float64_reference(regression_1d, classification):
    for (model, X, y), lik in (
        (regression_1d, "regression"),
        (classification, "classification"),
    ):
        Xq = torch.linspace(-3, 3, 9, dtype=DT)[:, None].expand(-1, X.shape[1])
        ref, _ = dense_reference(model, X, y, Xq, lik, "ggn")
        m32 = copy.deepcopy(model).float()
        y32 = y.float() if lik == "regression" else y
        la = Laplace(
            m32, lik, "all", "hfl", prior_precision=PRIOR,
            sigma_noise=SIGMA if lik == "regression" else 1.0,
        )  # fmt: skip
        la.fit(loader(X.float(), y32))
        f_mu, f_var = la.glm_predictive(Xq.float())
        assert f_var.dtype == torch.float32 and f_mu.dtype == torch.float32
        est = torch.diagonal(f_var, dim1=-2, dim2=-1).double()
        err = rel_err(est, torch.diagonal(ref, dim1=-2, dim2=-1))
        assert err.median() <= 0.02, f"{lik}: median {err.median():.2e}"
        assert est.min() > 0
