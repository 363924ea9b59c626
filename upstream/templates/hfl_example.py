"""Hessian-free Laplace on a 1-D regression problem.

Fits a small tanh MLP, builds the linearised-Laplace predictive with
``hessian_structure="hfl"`` (no Hessian is formed) and compares it with
``FullLaplace``, which forms and inverts the full GGN. The prior precision is
tuned by grid search on validation data: HFL has no marginal likelihood.

Run with ``python examples/hfl_example.py``.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import HessianStructure, Laplace

torch.manual_seed(711)


def make_data(n):
    X = torch.rand(n, 1) * 8 - 4
    y = torch.sin(X) + 0.3 * torch.randn(n, 1)
    return X, y


X_train, y_train = make_data(150)
X_val, y_val = make_data(50)
train_loader = DataLoader(TensorDataset(X_train, y_train), batch_size=50)
val_loader = DataLoader(TensorDataset(X_val, y_val), batch_size=50)
X_test = torch.linspace(-8, 8, 9).unsqueeze(-1)

# MAP: mean-squared error with weight decay, as in laplace-torch's regression example.
model = nn.Sequential(nn.Linear(1, 50), nn.Tanh(), nn.Linear(50, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
for _ in range(1000):
    optimizer.zero_grad()
    nn.functional.mse_loss(model(X_train), y_train).backward()
    optimizer.step()

# Hessian-free Laplace over all weights. Regression refits are exact
# (linearised network, target="ggn"), whether or not the MAP is stationary.
la = Laplace(model, "regression", "all", HessianStructure.HFL, sigma_noise=0.3)
la.fit(train_loader)
start = time.perf_counter()
la.optimize_prior_precision(method="gridsearch", val_loader=val_loader, grid_size=10)
tuning = time.perf_counter() - start
start = time.perf_counter()
f_mu, f_var = la(X_test)
predict = time.perf_counter() - start

# Dense reference: the same prior and noise, full GGN formed and inverted.
full = Laplace(
    copy.deepcopy(model),
    "regression",
    "all",
    "full",
    sigma_noise=0.3,
    prior_precision=la.prior_precision,
)
full.fit(train_loader)
_, f_var_full = full(X_test)

n_params = sum(p.numel() for p in model.parameters())
print(
    f"parameters: {n_params}, prior precision (grid search): {float(la.prior_precision):.3g}"
)
print(
    f"grid search: {tuning:.2f} s, predictive on {len(X_test)} points: {predict:.2f} s"
)
print("     x    f_mu   std HFL  std full")
for x, m, v, v_full in zip(X_test, f_mu, f_var, f_var_full):
    print(
        f"{float(x):6.1f} {float(m):7.3f} {float(v.sqrt()):9.4f} {float(v_full.sqrt()):9.4f}"
    )
rel_err = ((f_var - f_var_full).abs() / f_var_full).flatten()
print(
    f"relative variance error vs FullLaplace: median {rel_err.median():.1e}, "
    f"max {rel_err.max():.1e}"
)
assert float(rel_err.median()) < 1e-2, "HFL disagrees with FullLaplace"
