"""The methods compared, each as ``fit`` (one-time) and ``predict`` (per query).

Every method returns the linearised (GLM) predictive mean and output
covariance ``(B, C, C)`` at the query inputs; times are wall-clock seconds.
All use the same fixed ``sigma_noise`` and prior precision.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from laplace.curvature import CurvlinopsGGN, CurvlinopsHessian
from torch import Tensor, nn

import laplace_hfl  # noqa: F401  (registers "hfl")
from laplace_hfl.bench.benchmark.cases import Case
from laplace_hfl.bench.evaluation.predict import glm_predictive
from laplace_hfl.bench.evaluation.registry import MethodSpec, laplace_method
from laplace_hfl.engine.functional import output_jacobians

__all__ = ["METHODS", "build", "timed_fit_predict", "cg_inverse_predictor", "damped"]

_LAPLACE = [  # name, label, family, subset, structure, backend, constructor keywords
    ("hfl_naive", "HFL naive (1 direction at a time, plain CG)", "hfl", "all", "hfl",
     None, {"chunk_size": 1, "solver": "cg", "preconditioner": "none"}),
    ("hfl_batched_plain", "HFL batched, plain CG", "hfl", "all", "hfl", None,
     {"chunk_size": 256, "solver": "cg", "preconditioner": "none"}),
    ("hfl_batched", "HFL batched + Nystrom-preconditioned", "hfl", "all", "hfl", None,
     {"chunk_size": 256, "solver": "cg", "preconditioner": "nystrom"}),
    ("hfl_amortized", "HFL amortised (S=256)", "hfl", "all", "hfl", None,
     {"amortize": 256}),
    ("full_ggn", "FullLaplace GGN", "full", "all", "full", CurvlinopsGGN, {}),
    ("full_hessian", "FullLaplace Hessian", "full", "all", "full", CurvlinopsHessian,
     {}),
    ("kron", "KronLaplace (KFAC)", "kron", "all", "kron", None, {}),
    ("diag", "DiagLaplace", "diag", "all", "diag", None, {}),
    ("ll_kron", "last-layer KFAC", "ll", "last_layer", "kron", None, {}),
]  # fmt: skip

#: The methods timed side by side, by name. ``cg_inverse`` (``build=None``)
#: is curvlinops' CG inverse, built by :func:`cg_inverse_predictor`.
METHODS: dict[str, MethodSpec] = {
    name: replace(
        laplace_method(name, family, structure, subset, structure, backend, **kw),
        label=label,
    )
    for name, label, family, subset, structure, backend, kw in _LAPLACE
}
METHODS["cg_inverse"] = MethodSpec(
    "cg_inverse", "other", "curvlinops", "cg", None, label="curvlinops CG inverse"
)


def build(case: Case, method: str, **overrides: Any):
    """The unfitted estimator of ``method`` on a copy of ``case.model``."""
    return METHODS[method].build(
        copy.deepcopy(case.model), case.likelihood, case.sigma_noise,
        case.prior_precision, **overrides,
    )  # fmt: skip


def damped(A: Any, shapes: list[torch.Size], scale: float, damping: float) -> Any:
    """``scale * A + damping * I`` for a curvlinops operator ``A`` on parameters
    of ``shapes``.

    curvlinops 3.0.1 exports neither an identity operator nor its operator
    base class; subclassing that class and implementing ``_matmat`` /
    ``_adjoint`` is its documented way to write an operator, hence the one
    import from ``curvlinops._torch_base`` in the bench.
    """
    from curvlinops._torch_base import PyTorchLinearOperator

    class Damped(PyTorchLinearOperator):
        SELF_ADJOINT = True

        def __init__(self) -> None:
            super().__init__(shapes, shapes)

        def _matmat(self, X):
            return [scale * a + damping * x for a, x in zip(A @ X, X)]

        def _adjoint(self):
            return self

    return Damped()


def cg_inverse_predictor(
    case: Case, tolerance: float = 1e-6, max_iter: int = 1000
) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """curvlinops' ``CGInverseLinearOperator`` on the damped GGN (float64).

    ``scale * GGN_sum + prior * I`` equals laplace-torch's posterior precision
    (``scale = 1/(2 sigma^2)`` for a summed MSE, 1 for a summed cross-entropy).
    Prediction forms the query Jacobians ``(B, C, P)`` and applies the inverse
    to all ``B*C`` columns at once.
    """
    from curvlinops import CGInverseLinearOperator, GGNLinearOperator

    model = copy.deepcopy(case.model).double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if case.likelihood == "regression":
        loss, scale = nn.MSELoss(reduction="sum"), 1 / (2 * case.sigma_noise**2)
    else:
        loss, scale = nn.CrossEntropyLoss(reduction="sum"), 1.0
    data = [
        (
            case.X.double(),
            case.y.double() if case.likelihood == "regression" else case.y,
        )
    ]
    G = GGNLinearOperator(model, loss, params, data, check_deterministic=False)
    A = damped(G, [p.shape for p in params], scale, case.prior_precision)
    Ainv = CGInverseLinearOperator(A, tolerance=tolerance, max_iter=max_iter)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    from laplace_hfl.engine.functional import ParamLayout, make_forward

    layout = ParamLayout(tuple(names), tuple(p.shape for p in params))
    fixed = {n: b for n, b in model.named_buffers()}
    forward = make_forward(model, layout, fixed)
    theta = torch.cat([p.detach().flatten() for p in params])

    def predict(Xq: Tensor) -> tuple[Tensor, Tensor]:
        Js, f = output_jacobians(forward, theta, Xq.double())
        B, C, P = Js.shape
        U = Ainv @ Js.reshape(B * C, P).T  # (P, B*C)
        cov = torch.einsum("bcp,pbk->bck", Js, U.reshape(P, B, C))
        return f, 0.5 * (cov + cov.transpose(1, 2))

    return predict


def timed_fit_predict(
    case: Case, method: str, Xq: Tensor, **overrides: Any
) -> dict[str, Any]:
    """Fit once, predict at ``Xq``; returns times and the predictive."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        if method == "cg_inverse":
            predict = cg_inverse_predictor(case, **overrides)
        else:
            la = build(case, method, **overrides)
            la.fit(case.loader())
            if method.startswith("hfl") and "amortize" not in METHODS[method].options:
                glm_predictive(la, case.Xq[:1])  # unperturbed refit

            def predict(X: Tensor) -> tuple[Tensor, Tensor]:
                return glm_predictive(la, X)

        t1 = time.perf_counter()
        f_mu, f_var = predict(Xq)
        t2 = time.perf_counter()
    return {
        "fit_s": t1 - t0,
        "predict_s": t2 - t1,
        "f_mu": f_mu.detach().double(),
        "f_var": f_var.detach().double(),
    }
