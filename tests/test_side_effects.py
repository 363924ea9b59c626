"""The user's model is bit-for-bit unchanged by fit, predict, tuning and samples."""

from __future__ import annotations

import pytest
import torch
from conftest import DT, assert_unchanged, snapshot
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def awkward_model():
    """BatchNorm (buffers), dropout, a frozen layer, stale .grad, train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3),
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2),
    ).to(DT)  # fmt: skip
    X = torch.randn(40, 3, dtype=DT)
    y = torch.randn(40, 2, dtype=DT)
    model.train()
    for _ in range(3):  # populate BatchNorm running statistics
        model(X)
    model[0].weight.requires_grad_(False)  # frozen, LoRA-style subset
    model.eval()  # train near a minimum of the Laplace objective (prior 5)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.LBFGS(trainable, max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(X) - y).square().sum()
        loss = loss + 2.5 * sum(p.square().sum() for p in trainable)
        loss.backward()
        return loss

    opt.step(closure)
    model.train()
    loss = (model(X) - y).square().sum()
    loss.backward()  # leave stale .grad on the trainable parameters
    return model, X, y


@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("target", ["ggn", "hessian"])
def test_model_untouched(subset, target):
    model, X, y = awkward_model()
    snap = snapshot(model)
    loader = DataLoader(TensorDataset(X, y), batch_size=16)
    la = Laplace(model, "regression", subset, "hfl", target=target, prior_precision=5.0)
    la.fit(loader)
    assert_unchanged(model, snap)
    f_mu, f_var = la(X[:5])
    la(X[:3], joint=True)
    la.predictive_samples(X[:3], n_samples=4)
    la.optimize_prior_precision(
        method="gridsearch", val_loader=loader, grid_size=2, log_prior_prec_min=0
    )
    assert_unchanged(model, snap)
    assert torch.isfinite(f_var).all() and (torch.diagonal(f_var, 0, 1, 2) > 0).all()
    # BatchNorm used running statistics and dropout was off: mean is the eval output
    with torch.no_grad():
        model.eval()
        expected = model(X[:5])
        model.train()
    assert torch.allclose(f_mu, expected)
