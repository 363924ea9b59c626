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

from dataclasses import replace
from typing import Any

from laplace.curvature import AsdlGGN, CurvlinopsGGN

from laplace_hfl.bench.evaluation.registry import MethodSpec, laplace_method

__all__ = ["real_methods"]


def _method(name: str, family: str, subset: str, structure: str, backend: type,
            label: str, **fields: Any) -> MethodSpec:  # fmt: skip
    """A classification :class:`MethodSpec`; ``fields`` are the spec's
    (``tune``, ``max_test``, ...) or else constructor keywords."""
    spec_fields = {k: fields.pop(k) for k in list(fields) if k in _SPEC_FIELDS}
    kind = f"ll-{structure}" if subset == "last_layer" else structure
    spec = laplace_method(name, family, kind, subset, structure, backend, **fields)
    return replace(spec, label=label, **spec_fields)


_SPEC_FIELDS = ("fit_kwargs", "tune", "max_test", "budget_s", "reference")


def real_methods(
    *, dict_inputs: bool = False, n_hfl_ll: int = 2, n_hfl_all: int = 1,
    hfl_budget_s: float = 120.0, amortize: int = 16, amortize_max_iter: int = 100,
    ella_subsample: int = 40, ella_eigen: int = 20, valla_inducing: int = 20,
    valla_iterations: int = 20,
) -> list[MethodSpec]:  # fmt: skip
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
    list of MethodSpec
    """
    ggn = CurvlinopsGGN
    dk = {"dict_key_x": "input_ids", "dict_key_y": "labels"} if dict_inputs else {}
    return [
        MethodSpec("map", "map", "-", "map", None, label="MAP"),
        _method("ll_full", "ll", "last_layer", "full", ggn, "LL full GGN"),
        _method("ll_kron", "ll", "last_layer", "kron", ggn, "LL KFAC"),
        _method("kron", "kron", "all", "kron", ggn, "KFAC"),
        _method("diag", "diag", "all", "diag", AsdlGGN, "diag"),
        _method(
            "ella", "gp", "all", "gp", ggn, f"ELLA (M={ella_subsample}, K={ella_eigen})",
            functional_approximation="nystrom", subsample_size=ella_subsample,
            n_eigenvalues=ella_eigen, tune="grid", **dk,
        ),
        _method(
            "valla", "gp", "all", "gp", ggn, f"VaLLA (M={valla_inducing})",
            functional_approximation="variational", inducing_locations="random",
            num_inducing=valla_inducing, tune="own", **dk,
            fit_kwargs={"iterations": valla_iterations, "lr": 1e-2},
        ),
        _method(
            "hfl_ll", "hfl", "last_layer", "hfl", None, "HFL last layer",
            tune="from:ll_full", max_test=n_hfl_ll, budget_s=hfl_budget_s,
            reference="ll_full",
        ),
        _method(
            "hfl_all", "hfl", "all", "hfl", None, "HFL all (exact)", target="ggn",
            tune="from:kron", max_test=n_hfl_all, budget_s=hfl_budget_s,
            reference="kron",
        ),
        _method(
            "hfl_amortized", "hfl", "all", "hfl", None,
            f"HFL all (amortised S={amortize})", target="ggn", amortize=amortize,
            max_iter=amortize_max_iter, tune="from:kron", reference="hfl_all",
        ),
    ]  # fmt: skip
