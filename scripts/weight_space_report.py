"""Print how HFL's matrix-free weight-space posterior matches FullLaplace.

Rerunnable source of the numbers in ``docs/weight_space.md``::

    python scripts/weight_space_report.py

Float64 tiny tanh MLPs trained to a stationary point (the fixtures of
``tests/conftest.py``), all weights and last layer. Columns:

* ``H``, ``P@V``: max relative error of ``la.H.to_dense()`` and of
  ``la.posterior_precision @ V`` against ``FullLaplace(backend=AsdlGGN)``;
* ``cov4096``: relative Frobenius error of the covariance of
  ``la.sample(4096)`` against the dense ``P^-1``; ``full4096``: the same for
  ``FullLaplace.sample(4096)`` (an exact sampler; the floor at 4096 draws);
  ``se4096``: the RMS error an exact sampler has at 4096 draws;
* ``S*``, ``covS*``: the draws for which that RMS error is 2.5%, and HFL's
  error there;
* ``nn z``: largest ``|mean_HFL - mean_Full| / s.e.`` of the ``pred_type="nn"``
  predictive (2000 draws each; ~N(0, 1) per entry if they agree).

A last line gives ``cov4096`` for ``target="hessian"`` (Lanczos draws) against
the inverse of ``torch.func.hessian`` of the Laplace objective.
"""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's laplace_hfl

import conftest as C  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import AsdlGGN, CurvlinopsGGN  # noqa: E402


def _cases() -> dict:
    out = {}
    m, X, y = C.make_regression()
    out["regression_1d"] = (C.train_stationary(m, X, y, "regression"), X, y)
    m, X, y = C.make_regression(n=40, d_in=2, d_out=3, hidden=8, seed=1)
    out["regression_multi"] = (C.train_stationary(m, X, y, "regression"), X, y)
    m, X, y = C.make_classification()
    out["classification"] = (C.train_stationary(m, X, y, "classification"), X, y)
    return out


def _fit(model, X, y, lik, subset, structure, **kw):
    la = Laplace(
        copy.deepcopy(model), lik, subset, structure, prior_precision=C.PRIOR,
        sigma_noise=C.SIGMA if lik == "regression" else 1.0, **kw,
    )  # fmt: skip
    la.fit(C.loader(X, y))
    return la


def _cov_err(draws: torch.Tensor, Sigma: torch.Tensor) -> float:
    return float((torch.cov(draws.T) - Sigma).norm() / Sigma.norm())


def main() -> None:
    warnings.simplefilter("ignore")
    head = ("case", "subset", "P", "H", "P@V", "cov4096", "full4096", "se4096")
    head += ("S*", "covS*", "nn z")
    print(" ".join(f"{h:>9}" for h in head))
    for name, (model, X, y) in _cases().items():
        lik = "classification" if name == "classification" else "regression"
        for subset in ("all", "last_layer"):
            hfl = _fit(model, X, y, lik, subset, "hfl", chunk_size=8192)
            asdl = _fit(model, X, y, lik, subset, "full", backend=AsdlGGN)
            full = _fit(model, X, y, lik, subset, "full", backend=CurvlinopsGGN)
            n = hfl.n_params
            V = torch.randn(
                n, 8, generator=torch.Generator().manual_seed(0), dtype=C.DT
            )
            P_ref = asdl.posterior_precision
            e_H = float((hfl.H.to_dense() - asdl.H).abs().max() / asdl.H.abs().max())
            e_P = float((hfl.posterior_precision @ V - P_ref @ V).abs().max())
            e_P /= float((P_ref @ V).abs().max())
            Sigma = full.posterior_covariance
            fro2, tr = float(Sigma.square().sum()), float(Sigma.trace())
            se = math.sqrt((fro2 + tr**2) / 4096 / fro2)
            g = torch.Generator().manual_seed(3)
            cov = _cov_err(hfl.sample(4096, generator=g), Sigma)
            g = torch.Generator().manual_seed(3)
            cov_full = _cov_err(full.sample(4096, generator=g), Sigma)
            S = max(4096, math.ceil((1 + tr**2 / fro2) / 0.025**2))
            covS = _cov_err(hfl.sample(S, generator=g), Sigma)
            Xq, m = X[:6], 2000
            s1 = hfl.predictive_samples(
                Xq,
                pred_type="nn",
                n_samples=m,
                generator=torch.Generator().manual_seed(0),
            )
            s2 = full.predictive_samples(
                Xq,
                pred_type="nn",
                n_samples=m,
                generator=torch.Generator().manual_seed(1),
            )
            z = (s1.mean(0) - s2.mean(0)).abs() / ((s1.var(0) + s2.var(0)) / m).sqrt()
            row = (name, subset, n, f"{e_H:.1e}", f"{e_P:.1e}", f"{cov:.4f}")
            row += (f"{cov_full:.4f}", f"{se:.4f}", S, f"{covS:.4f}")
            row += (f"{float(z.max()):.2f}",)
            print(" ".join(f"{str(c):>9}" for c in row))
    _hessian_row()


def _hessian_row() -> None:
    """target="hessian" (Lanczos draws) on regression_1d vs torch.func.hessian."""
    model, X, y = _cases()["regression_1d"]
    la = _fit(model, X, y, "regression", "all", "hfl", target="hessian")
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def L(th):
        ps = {n: c.reshape(s) for n, c, s in zip(names, torch.split(th, sizes), shapes)}
        f = lambda inp: torch.func.functional_call(model, ps, (inp,))  # noqa: E731
        return C.laplace_objective(f, X, y, "regression", params=[th])

    Sigma = torch.linalg.inv(torch.func.hessian(L)(theta))
    fro2, tr = float(Sigma.square().sum()), float(Sigma.trace())
    la.chunk_size = 4096
    draws = la.sample(4096, generator=torch.Generator().manual_seed(3))
    se = math.sqrt((fro2 + tr**2) / 4096 / fro2)
    print(
        f"target='hessian' regression_1d all: cov4096 {_cov_err(draws, Sigma):.4f} "
        f"(exact-sampler RMS error at 4096 draws: {se:.4f})"
    )


if __name__ == "__main__":
    main()
