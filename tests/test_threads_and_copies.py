"""One estimator shared by threads; modules shared inside the model. Results
equal serial calls, and the user's model keeps its very Parameter objects
(leaves, trainable). Pickling and deep copies: ``tests/test_state.py``."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import DT, assert_unchanged, loader, snapshot
from laplace import Laplace
from torch import nn
from torch.func import functional_call, jacrev


def _fitted(model, X, y, **kw):
    kw.setdefault("subset_of_weights", "all")
    # tight refits: the variance stop's default 1e-3 would hide a structural
    # error of that size against the dense reference
    kw.setdefault("rtol", 1e-10)
    la = Laplace(
        model, "regression", hessian_structure="hfl", sigma_noise=0.3,
        prior_precision=0.5, **kw,
    )  # fmt: skip
    la.fit(loader(X, y))
    return la


def test_two_threads_give_serial_results_and_leave_leaves(regression_1d):
    model, X, y = regression_1d
    snap = snapshot(model)
    la = _fitted(model, X, y, solver="cg")
    queries = [X[i : i + 1] for i in range(4)]
    serial = [la(q)[1] for q in queries]
    results: dict[tuple[int, int], object] = {}

    def work(t: int) -> None:
        for k in range(8):
            try:
                results[t, k] = la(queries[(k + t) % 4])[1]
            except Exception as err:  # pragma: no cover - reported below
                results[t, k] = err

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16
    for (t, k), var in results.items():
        assert isinstance(var, torch.Tensor), var
        torch.testing.assert_close(var, serial[(k + t) % 4], rtol=1e-12, atol=0)
    assert_unchanged(model, snap)
    assert all(p.is_leaf and p.requires_grad for p in model.parameters())
    torch.optim.SGD(model.parameters(), lr=0.1)
    copy.deepcopy(model)


def _shared_module_model():
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(2, 1)).to(DT)


def _reference_variance(model, X, y, Xq, sigma=0.3, prior=0.5):
    """GGN + prior by torch.func on a copy (dedup names: lin counted once)."""
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    names, shapes = list(named), [p.shape for p in named.values()]
    theta = torch.cat([p.detach().flatten() for p in named.values()])

    def f(th, inp):
        ps = dict(zip(names, (c.reshape(s) for c, s in zip(
            torch.split(th, [s.numel() for s in shapes]), shapes))))  # fmt: skip
        return functional_call(model, ps, (inp,))

    J = jacrev(f)(theta, X).reshape(len(X), -1)
    P = J.T @ J / sigma**2 + prior * torch.eye(len(theta), dtype=DT)
    Jq = jacrev(f)(theta, Xq).reshape(len(Xq), -1)
    return torch.einsum("bp,pq,bq->b", Jq, torch.linalg.inv(P), Jq)


@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_module_registered_twice(solver):
    model = _shared_module_model()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20, 2, generator=g, dtype=DT)
    y = torch.randn(20, 1, generator=g, dtype=DT)
    snap = snapshot(model)
    la = _fitted(model, X, y, solver=solver)
    _, var = la(X[:3])
    torch.testing.assert_close(
        var.flatten(), _reference_variance(model, X, y, X[:3]), rtol=1e-6, atol=1e-12
    )
    assert_unchanged(model, snap)
    model(X)
    model.state_dict()
    mu, v = la(X[:3], pred_type="nn", link_approx="mc", n_samples=4)
    assert mu.shape == v.shape == (3, 1)
    assert_unchanged(model, snap)


def test_tied_weights_in_two_modules():
    torch.manual_seed(0)
    enc, dec = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec, nn.Tanh(), nn.Linear(2, 1)).to(DT)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(20, 2, generator=g, dtype=DT)
    y = torch.randn(20, 1, generator=g, dtype=DT)
    snap = snapshot(model)
    la = _fitted(model, X, y, solver="cg", preconditioner="none")
    _, var = la(X[:3])
    torch.testing.assert_close(
        var.flatten(), _reference_variance(model, X, y, X[:3]), rtol=1e-6, atol=1e-12
    )
    assert_unchanged(model, snap)


def test_another_thread_toggling_train_mode(regression_1d):
    _, X, y = regression_1d
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 1)
    ).to(DT)
    model.eval()
    la = _fitted(model, X, y, solver="cg")
    expected = la(X[:3])[1]
    stop = threading.Event()

    def toggle() -> None:
        while not stop.is_set():
            model.train()
            model.eval()

    thread = threading.Thread(target=toggle)
    thread.start()
    try:
        for _ in range(3):
            la.refit_preconditioner(rebuild=True)  # drops the caches: refit every time
            torch.testing.assert_close(la(X[:3])[1], expected, rtol=1e-12, atol=0)
    finally:
        stop.set()
        thread.join()
