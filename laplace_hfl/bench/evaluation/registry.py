"""Named estimator configurations: the one method type of the bench.

A :class:`MethodSpec` builds an unfitted Laplace object from a model (which
the harness has already deep-copied: BackPACK's ``extend()`` leaves hooks on a
model that break ASDL afterwards) through
``build(model, likelihood, sigma_noise, prior_precision, **overrides)``;
:func:`laplace_builder` writes such a ``build`` for ``Laplace(...)``.
:data:`METHODS` holds the methods of ``laplace-hfl compare``; the speed
benchmark (:data:`laplace_hfl.bench.benchmark.methods.METHODS`) and the
real-network benchmark (:func:`laplace_hfl.bench.benchmark.realnets_methods.real_methods`)
list their own configurations as ``MethodSpec`` too. Add a compare method with
:func:`register_method`::

    from laplace.curvature import AsdlEF
    from laplace_hfl.bench.evaluation import MethodSpec, laplace_builder, register_method

    register_method(MethodSpec(
        name="kron_asdl_ef", family="kron", backend="AsdlEF", structure="kron",
        build=laplace_builder("all", "kron", AsdlEF),
    ))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from laplace import Laplace
from laplace.curvature import (
    AsdlGGN,
    AsdlHessian,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
)
from torch import nn

import laplace_hfl  # noqa: F401  (registers hessian_structure="hfl")

__all__ = [
    "MethodSpec",
    "METHODS",
    "DEFAULT_METHODS",
    "REFERENCE_HESSIAN",
    "REFERENCE_GGN",
    "register_method",
    "resolve_methods",
    "laplace_builder",
    "laplace_method",
]

#: Name of the exact-Hessian reference (full Laplace, curvlinops Hessian).
REFERENCE_HESSIAN = "full_curvlinops_hessian"
#: Name of the GGN reference (full Laplace, curvlinops GGN).
REFERENCE_GGN = "full_curvlinops_ggn"

#: ``build(model, likelihood, sigma_noise, prior_precision, **overrides)``.
Builder = Callable[..., Any]


@dataclass(frozen=True)
class MethodSpec:
    """One named estimator configuration.

    Attributes
    ----------
    name : str
        Registry key (``laplace-hfl compare --methods NAME``).
    family : {"map", "hfl", "full", "kron", "diag", "ll", "gp"}
        Row grouping in reports.
    backend : str
        Curvature backend (``"-"`` for the MAP, ``"hfl"`` for HFL).
    structure : str
        Hessian structure and weight subset, e.g. ``"full"``, ``"kron"``,
        ``"ll-full"``, ``"hfl-hessian"``.
    build : callable or None
        ``build(model, likelihood, sigma_noise, prior_precision, **overrides)``
        returning an unfitted laplace-torch object (``overrides`` replace its
        constructor keywords); ``None`` for the MAP network itself (or a
        predictor the benchmark builds itself).
    options : dict
        The estimator's own constructor keywords (e.g. HFL settings), written
        to the results.
    label : str
        Legend label (default: ``name``).
    fit_kwargs : dict
        Extra keyword arguments of ``fit`` (VaLLA's iterations).
    tune : str
        How the real-network benchmark chooses its prior precision:
        ``"marglik"``, ``"grid"``, ``"from:<name>"`` or ``"own"``
        (:mod:`laplace_hfl.bench.benchmark.realnets_methods`); the comparison
        takes ``tune`` as an argument instead.
    max_test : int or None
        Test inputs per shift level (``None``: all); for methods whose
        queries are expensive.
    budget_s : float or None
        Prediction time budget: once spent, the remaining shift levels are
        skipped.
    reference : str or None
        Method whose variances this one is compared with on shared queries.
    """

    name: str
    family: str = ""
    backend: str = ""
    structure: str = ""
    build: Builder | None = None
    options: dict = field(default_factory=dict)
    label: str = ""
    fit_kwargs: dict = field(default_factory=dict)
    tune: str = "marglik"
    max_test: int | None = None
    budget_s: float | None = None
    reference: str | None = None


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` (replacing one of the same name).

    Parameters
    ----------
    spec : MethodSpec

    Returns
    -------
    MethodSpec
        ``spec``, so it can be used as an expression.
    """
    METHODS[spec.name] = spec
    return spec


def laplace_builder(
    subset: str, structure: str, backend: type | None = None, **kw: Any
) -> Builder:
    """A :attr:`MethodSpec.build` that calls ``laplace.Laplace``.

    Parameters
    ----------
    subset : {"all", "last_layer", "subnetwork"}
    structure : str
        ``hessian_structure`` (``"hfl"``, ``"full"``, ``"kron"``, ``"gp"``, ...).
    backend : type, optional
        Curvature backend class (laplace-torch's default when ``None``).
    **kw
        Further constructor keywords; those given to ``build`` replace them.

    Returns
    -------
    callable
        ``build(model, likelihood, sigma_noise, prior_precision, **overrides)``.
    """

    def build(
        model: nn.Module, likelihood: str, sigma: float, prior: float, **overrides: Any
    ) -> Any:
        extra = {"backend": backend} if backend is not None else {}
        return Laplace(
            model,
            likelihood,
            subset,
            structure,
            sigma_noise=sigma,
            prior_precision=prior,
            **extra,
            **{**kw, **overrides},
        )

    return build


def laplace_method(
    name: str, family: str, kind: str, subset: str, structure: str,
    backend: type | None = None, **kw: Any,
) -> MethodSpec:  # fmt: skip
    """A :class:`MethodSpec` for ``Laplace(model, lik, subset, structure, **kw)``.

    Parameters
    ----------
    name, family : str
        As in :class:`MethodSpec`.
    kind : str
        :attr:`MethodSpec.structure` (e.g. ``"ll-full"``, ``"hfl-ggn"``).
    subset, structure, backend, **kw
        As in :func:`laplace_builder`; ``kw`` become :attr:`MethodSpec.options`.

    Returns
    -------
    MethodSpec
    """
    backend_name = (
        backend.__name__ if backend else "hfl" if structure == "hfl" else "default"
    )
    build = laplace_builder(subset, structure, backend, **kw)
    return MethodSpec(name, family, backend_name, kind, build, dict(kw))


_HFL = {"eps": 1e-2, "rtol": 1e-6}

register_method(MethodSpec("map", "map", "-", "map", None))
for _name, _kind, _subset, _kw in [
    ("hfl_ggn", "hfl-ggn", "all", {"target": "ggn"}),
    ("hfl_hessian", "hfl-hessian", "all", {"target": "hessian"}),
    ("hfl_ll", "ll-hfl", "last_layer", {"target": "ggn"}),
    ("hfl_amortized", "hfl-ggn-amortized", "all", {"target": "ggn", "amortize": 256}),
]:
    register_method(laplace_method(_name, "hfl", _kind, _subset, "hfl", **_kw, **_HFL))
for _backend, _kind in [
    (CurvlinopsHessian, "hessian"),
    (AsdlHessian, "hessian"),
    (CurvlinopsGGN, "ggn"),
    (BackPackGGN, "ggn"),
    (AsdlGGN, "ggn"),
    (CurvlinopsEF, "ef"),
]:
    _lib = _backend.__name__.lower().replace("hessian", "").replace("ggn", "")
    _lib = _lib.replace("ef", "")
    register_method(
        laplace_method(f"full_{_lib}_{_kind}", "full", "full", "all", "full", _backend)
    )
for _structure in ("kron", "diag"):
    for _backend in (CurvlinopsGGN, BackPackGGN, AsdlGGN):
        _lib = _backend.__name__.lower().replace("ggn", "")
        _name = f"{_structure}_{_lib}_ggn"
        register_method(
            laplace_method(_name, _structure, _structure, "all", _structure, _backend)
        )
for _name, _structure, _backend in [
    ("ll_full_curvlinops_ggn", "full", CurvlinopsGGN),
    ("ll_kron_asdl_ggn", "kron", AsdlGGN),
]:
    register_method(
        laplace_method(_name, "ll", f"ll-{_structure}", "last_layer", _structure,
                       _backend)
    )  # fmt: skip

# laplace-torch's scalable linearised-Laplace (function-space) methods, at
# sizes that fit the small tasks (ELLA's basis and FunctionalLaplace's subset
# are capped at 32 training inputs; VaLLA uses the library's fit defaults).
for _name, _kind, _kw in [
    ("ella", "gp-nystrom", {"functional_approximation": "nystrom",
                            "subsample_size": 32, "n_eigenvalues": 8}),
    ("valla", "gp-variational", {"functional_approximation": "variational",
                                 "inducing_locations": "random", "num_inducing": 16}),
    ("gp_sod", "gp-sod", {"n_subset": 32}),
]:  # fmt: skip
    register_method(
        laplace_method(_name, "gp", _kind, "all", "gp", CurvlinopsGGN, **_kw)
    )

#: Methods run when none are named: everything registered at import time.
DEFAULT_METHODS: tuple[str, ...] = tuple(METHODS)


def resolve_methods(names: list[str] | None) -> list[MethodSpec]:
    """Specs for ``names`` (all :data:`DEFAULT_METHODS` when ``None``).

    References run first so that agreement can be computed for everyone.

    Raises
    ------
    KeyError
        An unknown name (the message lists the known ones).
    """
    names = list(DEFAULT_METHODS) if not names else list(names)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise KeyError(
            f"Unknown method(s) {unknown}; known: {sorted(METHODS)}. "
            "Register new ones with laplace_hfl.bench.evaluation.register_method."
        )
    order = {REFERENCE_HESSIAN: 0, REFERENCE_GGN: 1}
    return [METHODS[n] for n in sorted(names, key=lambda n: order.get(n, 2))]
