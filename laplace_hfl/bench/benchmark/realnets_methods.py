"""The methods of the real-network benchmark and how each is tuned.

Every method is built on a deep copy of the same trained model. ``tune`` says
how its prior precision is chosen (the protocol is written to the results):

- ``"marglik"``: laplace-torch's marginal-likelihood optimisation (scalar
  prior; the Laplace Redux protocol), for every method that has one;
- ``"grid"``: grid search on the validation NLL (probit predictive, unrotated
  validation images), for methods without a marginal likelihood (ELLA);
- ``"from:<name>"``: the prior chosen by ``<name>``'s grid search. Used for
  the exact HFL modes, whose per-query refits make a validation grid search
  too slow on this CPU, borrowed from the method with the same posterior
  target (``ll_full`` for last-layer HFL, exactly the same posterior) or
  the closest affordable one (all-weights KFAC for all-weights HFL), so that
  an HFL row differs from its donor only by the estimator;
- ``"own"``: the method optimises it itself (VaLLA's variational objective).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from laplace import Laplace
from laplace.curvature import AsdlGGN, CurvlinopsGGN
from torch import nn

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")

__all__ = ["RealMethod", "real_methods"]

Build = Callable[[nn.Module, float], Any]


@dataclass(frozen=True)
class RealMethod:
    """One method of the real-network benchmark.

    Attributes
    ----------
    name : str
    build : callable or None
        ``build(model, prior_precision)`` returning an unfitted Laplace
        object; ``None`` for the MAP.
    fit_kwargs : dict
        Extra keyword arguments of ``fit`` (VaLLA's iterations).
    tune : str
        ``"marglik"``, ``"grid"``, ``"from:<name>"`` or ``"own"`` (see the
        module docstring).
    max_test : int or None
        Test images per shift level (``None``: the case's number); the
        per-method budget of methods whose queries are expensive.
    budget_s : float or None
        Prediction time budget: once spent, the remaining shift levels are
        skipped (levels are then visited ends and middle first).
    reference : str or None
        Method whose variances this one is compared with on shared queries.
    label : str
        Legend label.
    """

    name: str
    build: Build | None
    fit_kwargs: dict = field(default_factory=dict)
    tune: str = "marglik"
    max_test: int | None = None
    budget_s: float | None = None
    reference: str | None = None
    label: str = ""


def _la(subset: str, structure: str, **kw: Any) -> Build:
    def build(model: nn.Module, prior: float) -> Any:
        return Laplace(
            model, "classification", subset, structure, prior_precision=prior, **kw
        )

    return build


def real_methods(
    *,
    dict_inputs: bool = False,
    n_hfl_ll: int = 2,
    n_hfl_all: int = 1,
    hfl_budget_s: float = 120.0,
    amortize: int = 16,
    amortize_max_iter: int = 100,
    ella_subsample: int = 40,
    ella_eigen: int = 20,
    valla_inducing: int = 20,
    valla_iterations: int = 20,
) -> list[RealMethod]:
    """The benchmark's methods, donors of borrowed priors first.

    Parameters
    ----------
    dict_inputs : bool, default=False
        Models fed dict batches (``input_ids`` / ``labels``): curvature
        backends that accept mappings are used (Curvlinops, ASDL).
    n_hfl_ll, n_hfl_all : int
        Test images per shift level for last-layer / all-weights exact HFL.
    hfl_budget_s : float
        Prediction time budget of each exact HFL mode (seconds).
    amortize : int
        Posterior samples ``S`` of amortised all-weights HFL.
    amortize_max_iter : int
        CG iteration cap of the amortised fit (its time budget).
    ella_subsample, ella_eigen : int
        ELLA's Nystrom subset size and retained eigenvalues.
    valla_inducing, valla_iterations : int
        VaLLA's inducing points and optimiser steps.

    Returns
    -------
    list of RealMethod
    """
    ggn = {"backend": CurvlinopsGGN}
    dk = {"dict_key_x": "input_ids", "dict_key_y": "labels"} if dict_inputs else {}
    return [
        RealMethod("map", None, label="MAP"),
        RealMethod("ll_full", _la("last_layer", "full", **ggn), label="LL full GGN"),
        RealMethod("ll_kron", _la("last_layer", "kron", **ggn), label="LL KFAC"),
        RealMethod("kron", _la("all", "kron", **ggn), label="KFAC"),
        RealMethod("diag", _la("all", "diag", backend=AsdlGGN), label="diag"),
        RealMethod(
            "ella",
            _la(
                "all",
                "gp",
                functional_approximation="nystrom",
                subsample_size=ella_subsample,
                n_eigenvalues=ella_eigen,
                **ggn,
                **dk,
            ),
            tune="grid",
            label=f"ELLA (M={ella_subsample}, K={ella_eigen})",
        ),  # fmt: skip
        RealMethod(
            "valla",
            _la(
                "all",
                "gp",
                functional_approximation="variational",
                inducing_locations="random",
                num_inducing=valla_inducing,
                **ggn,
                **dk,
            ),
            fit_kwargs={"iterations": valla_iterations, "lr": 1e-2},
            tune="own",
            label=f"VaLLA (M={valla_inducing})",
        ),  # fmt: skip
        RealMethod(
            "hfl_ll",
            _la("last_layer", "hfl"),
            tune="from:ll_full",
            max_test=n_hfl_ll,
            budget_s=hfl_budget_s,
            reference="ll_full",
            label="HFL last layer",
        ),  # fmt: skip
        RealMethod(
            "hfl_all",
            _la("all", "hfl", target="ggn"),
            tune="from:kron",
            max_test=n_hfl_all,
            budget_s=hfl_budget_s,
            reference="kron",
            label="HFL all (exact)",
        ),  # fmt: skip
        RealMethod(
            "hfl_amortized",
            _la(
                "all",
                "hfl",
                target="ggn",
                amortize=amortize,
                max_iter=amortize_max_iter,
            ),
            tune="from:kron",
            reference="hfl_all",
            label=f"HFL all (amortised S={amortize})",
        ),  # fmt: skip
    ]
