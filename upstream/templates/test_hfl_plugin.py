"""``hessian_structure="hfl"`` from the installed ``laplace-hfl`` package.

Skipped unless ``laplace-hfl`` (``pip install laplace-torch[hfl]``) is installed
and declares the ``laplace.structures`` entry point ``hfl``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import CurvlinopsGGN
from laplace.laplace import STRUCTURE_ENTRY_POINTS

pytestmark = pytest.mark.skipif(
    not entry_points(group=STRUCTURE_ENTRY_POINTS, name="hfl"),
    reason="laplace-hfl is not installed (pip install laplace-torch[hfl])",
)


@pytest.fixture
def model_and_loader():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    X = torch.linspace(-2, 2, 24, dtype=torch.float64).unsqueeze(-1)
    y = torch.sin(2 * X) + 0.1 * torch.randn_like(X)
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_hfl_variance_matches_full_ggn_laplace(model_and_loader, subset):
    model, loader = model_and_loader
    kwargs = {"sigma_noise": 0.3, "prior_precision": 0.5}
    la = Laplace(model, "regression", subset, "hfl", **kwargs)
    assert type(la).__module__.split(".")[0] == "laplace_hfl"
    full = Laplace(model, "regression", subset, "full", backend=CurvlinopsGGN, **kwargs)
    la.fit(loader)
    full.fit(loader)
    X = torch.tensor([[-3.0], [0.5], [3.0]], dtype=torch.float64)
    _, var = la(X)
    _, var_full = full(X)
    torch.testing.assert_close(var, var_full, rtol=1e-3, atol=0.0)
