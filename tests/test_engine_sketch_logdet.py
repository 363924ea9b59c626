"""``log det(h G + diag(p_0))`` from one Nyström sketch of ``G``
(``laplace_hfl.engine.sketch_logdet``), against ``torch.logdet`` of the dense
float64 matrix: exact (values and gradients in ``h`` and the prior) when the
sketch rank reaches the rank of ``G``, bracketed by the reported truncation
below it."""

from __future__ import annotations

import pytest
import torch

from laplace_hfl.engine.sketch_logdet import curvature_sketch, sketch_logdet

DT = torch.float64
P = 60
NUMELS = (10, 20, 30)


def _curvature(rank, decay=-3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(rank, P, generator=g, dtype=DT)
    J = J * torch.logspace(0, decay, rank, dtype=DT)[:, None]
    return 3 * J.T @ J


def _prior(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "scalar":
        return torch.tensor([0.7], dtype=DT), (P,)
    if kind == "layerwise":
        return 0.2 + torch.rand(len(NUMELS), generator=g, dtype=DT), NUMELS
    return 0.2 + torch.rand(P, generator=g, dtype=DT), None


def _diag(prior, numels):
    if numels is None:
        return prior
    return torch.repeat_interleave(prior, torch.tensor(numels))


def _value_and_grads(fn, h, prior):
    h = h.clone().requires_grad_(True)
    prior = prior.clone().requires_grad_(True)
    value = fn(h, prior)
    value.backward()
    return value.detach(), h.grad, prior.grad


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diag"])
@pytest.mark.parametrize(("rank_g", "k"), [(15, 25), (15, 60), (60, 60)])
def test_exact_when_the_sketch_reaches_the_rank(kind, rank_g, k):
    """``k >= rank(G)`` (the sketch keeps fewer than ``k`` directions) or
    ``k >= P``: no probes, value and gradients equal the dense ones."""
    G = _curvature(rank_g)
    sketch = curvature_sketch(lambda V: V @ G, torch.zeros(P, dtype=DT), k, 16)
    assert sketch.exact and sketch.Z is None and sketch.products == k
    prior, numels = _prior(kind)
    h = torch.tensor(40.0, dtype=DT)
    got = _value_and_grads(
        lambda h, p: sketch_logdet(sketch, h, p, numels)[0], h, prior
    )
    ref = _value_and_grads(
        lambda h, p: torch.logdet(h * G + torch.diag(_diag(p, numels))), h, prior
    )
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert sketch_logdet(sketch, h, prior, numels)[1].truncation == 0.0


def test_grouped_prior_equals_its_diagonal():
    """The per-group path (Gram matrices per group) is the diagonal path with
    the prior repeated over each group, remainder probes included."""
    G = _curvature(60)
    sketch = curvature_sketch(lambda V: V @ G, torch.zeros(P, dtype=DT), 20, 16)
    assert not sketch.exact
    prior, numels = _prior("layerwise")
    h = torch.tensor(5.0, dtype=DT)
    grouped, info_g = sketch_logdet(sketch, h, prior, numels)
    diag, info_d = sketch_logdet(sketch, h, _diag(prior, numels))
    torch.testing.assert_close(grouped, diag, rtol=1e-12, atol=1e-10)
    assert info_g.stderr == pytest.approx(info_d.stderr, rel=1e-9)
    assert info_g.truncation == pytest.approx(info_d.truncation, rel=1e-9)


@pytest.mark.parametrize("kind", ["scalar", "layerwise", "diag"])
def test_below_the_rank_the_truncation_brackets_the_value(kind):
    """``k < rank(G)``: the dense value lies in ``[value - truncation, value]``
    up to 4 standard errors; the interval narrows as ``k`` grows."""
    G = _curvature(60, decay=-5.0)
    prior, numels = _prior(kind)
    h = torch.tensor(40.0, dtype=DT)
    ref = float(torch.logdet(h * G + torch.diag(_diag(prior, numels))))
    widths = []
    for k in (20, 35, 50):
        sketch = curvature_sketch(lambda V: V @ G, torch.zeros(P, dtype=DT), k, 32)
        value, info = sketch_logdet(sketch, h, prior, numels)
        assert not sketch.exact and info.stderr > 0 and info.truncation > 0
        value = float(value)
        assert value - info.truncation - 4 * info.stderr < ref
        assert ref < value + 4 * info.stderr
        widths.append(info.truncation)
    assert widths[0] > widths[1] > widths[2]
