"""Named estimator configurations compared by the harness.

Each :class:`MethodSpec` builds a fitted-to-be Laplace object from a model
(which the runner has already deep-copied: BackPACK's ``extend()`` leaves hooks
on a model that break ASDL afterwards). Add a method with
:func:`register_method`::

    from laplace import Laplace
    from laplace.curvature import AsdlEF
    from laplace_hfl.bench.evaluation import MethodSpec, register_method

    register_method(MethodSpec(
        name="kron_asdl_ef", family="kron", backend="AsdlEF", structure="kron",
        build=lambda model, lik, sigma, prior: Laplace(
            model, lik, "all", "kron", sigma_noise=sigma,
            prior_precision=prior, backend=AsdlEF),
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
]

#: Name of the exact-Hessian reference (full Laplace, curvlinops Hessian).
REFERENCE_HESSIAN = "full_curvlinops_hessian"
#: Name of the GGN reference (full Laplace, curvlinops GGN).
REFERENCE_GGN = "full_curvlinops_ggn"

Builder = Callable[[nn.Module, str, float, float], Any]


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
        ``build(model, likelihood, sigma_noise, prior_precision)`` returning an
        unfitted laplace-torch object; ``None`` for the MAP network itself.
    options : dict
        Free-form notes written to the results (e.g. HFL settings).
    """

    name: str
    family: str
    backend: str
    structure: str
    build: Builder | None
    options: dict = field(default_factory=dict)


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


def _la(subset: str, structure: str, backend: type | None = None, **kw: Any) -> Builder:
    def build(model: nn.Module, likelihood: str, sigma: float, prior: float) -> Any:
        extra = {"backend": backend} if backend is not None else {}
        return Laplace(
            model,
            likelihood,
            subset,
            structure,
            sigma_noise=sigma,
            prior_precision=prior,
            **extra,
            **kw,
        )

    return build


_HFL = {"eps": 1e-2, "rtol": 1e-6}

register_method(MethodSpec("map", "map", "-", "map", None))
register_method(
    MethodSpec(
        "hfl_ggn", "hfl", "hfl", "hfl-ggn",
        _la("all", "hfl", target="ggn", **_HFL), {"target": "ggn", **_HFL},
    )
)  # fmt: skip
register_method(
    MethodSpec(
        "hfl_hessian", "hfl", "hfl", "hfl-hessian",
        _la("all", "hfl", target="hessian", **_HFL), {"target": "hessian", **_HFL},
    )
)  # fmt: skip
register_method(
    MethodSpec(
        "hfl_ll", "hfl", "hfl", "ll-hfl",
        _la("last_layer", "hfl", target="ggn", **_HFL), {"target": "ggn", **_HFL},
    )
)  # fmt: skip
register_method(
    MethodSpec(
        "hfl_amortized", "hfl", "hfl", "hfl-ggn-amortized",
        _la("all", "hfl", target="ggn", amortize=256, **_HFL),
        {"target": "ggn", "amortize": 256, **_HFL},
    )
)  # fmt: skip
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
        MethodSpec(
            f"full_{_lib}_{_kind}", "full", _backend.__name__, "full",
            _la("all", "full", _backend),
        )
    )  # fmt: skip
for _structure in ("kron", "diag"):
    for _backend in (CurvlinopsGGN, BackPackGGN, AsdlGGN):
        _lib = _backend.__name__.lower().replace("ggn", "")
        register_method(
            MethodSpec(
                f"{_structure}_{_lib}_ggn", _structure, _backend.__name__,
                _structure, _la("all", _structure, _backend),
            )
        )  # fmt: skip
register_method(
    MethodSpec(
        "ll_full_curvlinops_ggn", "ll", "CurvlinopsGGN", "ll-full",
        _la("last_layer", "full", CurvlinopsGGN),
    )
)  # fmt: skip
register_method(
    MethodSpec(
        "ll_kron_asdl_ggn", "ll", "AsdlGGN", "ll-kron",
        _la("last_layer", "kron", AsdlGGN),
    )
)  # fmt: skip

# laplace-torch's scalable linearised-Laplace (function-space) methods, at
# sizes that fit the small tasks (ELLA's basis and FunctionalLaplace's subset
# are capped at 32 training inputs; VaLLA uses the library's fit defaults).
register_method(
    MethodSpec(
        "ella", "gp", "CurvlinopsGGN", "gp-nystrom",
        _la("all", "gp", CurvlinopsGGN, functional_approximation="nystrom",
            subsample_size=32, n_eigenvalues=8),
        {"subsample_size": 32, "n_eigenvalues": 8},
    )
)  # fmt: skip
register_method(
    MethodSpec(
        "valla", "gp", "CurvlinopsGGN", "gp-variational",
        _la("all", "gp", CurvlinopsGGN, functional_approximation="variational",
            inducing_locations="random", num_inducing=16),
        {"num_inducing": 16, "inducing_locations": "random"},
    )
)  # fmt: skip
register_method(
    MethodSpec(
        "gp_sod", "gp", "CurvlinopsGGN", "gp-sod",
        _la("all", "gp", CurvlinopsGGN, n_subset=32), {"n_subset": 32},
    )
)  # fmt: skip

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
