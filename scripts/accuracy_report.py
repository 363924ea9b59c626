"""Print HFL's agreement with FullLaplace and a dense torch.func reference.

Rerunnable source of the accuracy numbers quoted in the README::

    python scripts/accuracy_report.py

Float64 tiny tanh MLPs trained to a stationary point (the fixtures of
``tests/conftest.py``); errors on the correlation scale, as in
``tests/test_accuracy.py``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import conftest as C  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN, CurvlinopsHessian  # noqa: E402
from test_accuracy import fit_full, fit_hfl, predictive_cov, scaled_err  # noqa: E402


def cases() -> dict:
    out = {}
    m, X, y = C.make_regression()
    out["regression_1d"] = (C.train_stationary(m, X, y, "regression"), X, y)
    m, X, y = C.make_regression(n=40, d_in=2, d_out=3, hidden=8, seed=1)
    out["regression_multi"] = (C.train_stationary(m, X, y, "regression"), X, y)
    m, X, y = C.make_classification()
    out["classification"] = (C.train_stationary(m, X, y, "classification"), X, y)
    return out


def main() -> None:
    warnings.filterwarnings("ignore")
    data = cases()
    for case, (model, X, y) in data.items():
        lik = "classification" if case == "classification" else "regression"
        Xq = torch.linspace(-3, 3, 7, dtype=C.DT)[:, None].expand(-1, X.shape[1]) * 1.1
        for subset in ("all", "last_layer"):
            for target in ("hessian", "ggn"):
                est = predictive_cov(fit_hfl(model, X, y, lik, subset, target), Xq)
                kind = "hessian" if target == "hessian" and subset == "all" else "ggn"
                backend = CurvlinopsHessian if kind == "hessian" else CurvlinopsGGN
                full = predictive_cov(fit_full(model, X, y, lik, subset, backend), Xq)
                dense, _ = C.dense_reference(
                    model, X, y, Xq, lik, kind, last_layer=subset == "last_layer"
                )
                e1, e2 = scaled_err(est, full), scaled_err(est, dense)
                print(
                    f"{case:17s} {subset:10s} {target:8s} vs Full: median "
                    f"{e1.median():.1e} max {e1.max():.1e} | vs dense: median "
                    f"{e2.median():.1e} max {e2.max():.1e}"
                )
    for case in ("regression_1d", "classification"):
        model, X, y = data[case]
        lik = "classification" if case == "classification" else "regression"
        Xq = torch.linspace(-3, 3, 9, dtype=C.DT)[:, None].expand(-1, X.shape[1])
        ref, _ = C.dense_reference(model, X, y, Xq, lik, "ggn")
        la = Laplace(
            copy.deepcopy(model).float(), lik, "all", "hfl", prior_precision=C.PRIOR,
            sigma_noise=C.SIGMA if lik == "regression" else 1.0,
        )  # fmt: skip
        la.fit(C.loader(X.float(), y.float() if lik == "regression" else y))
        _, v = la.glm_predictive(Xq.float())
        e = C.rel_err(torch.diagonal(v, 0, 1, 2).double(), torch.diagonal(ref, 0, 1, 2))
        print(f"float32 model {case}: median {e.median():.1e} max {e.max():.1e}")


if __name__ == "__main__":
    main()
