"""The keyword-only HFL options of both estimator classes, in one place.

:class:`HFLOptions` names every option with its default;
:func:`validate_hfl_options` checks them; :func:`hfl_signature` shows a
constructor with laplace-torch's signature followed by the options, and
:func:`constructor_arguments` splits and checks a call of that signature, so
neither class repeats the argument list. Adding an option is one field here,
its checks in :func:`validate_hfl_options` and its entry in
:data:`laplace_hfl._docs.HFL_OPTIONS_DOC`.

``chunk_size`` has one meaning: the number of ``P``-vectors (refit directions)
handled by one vectorised product. Every other batch size is derived from it
by one named function here: :func:`query_points`, :func:`hessian_rows`,
:func:`sketch_columns` and :func:`sample_chunk`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from laplace_hfl.engine.precond_objects import PRECONDITIONERS as _PRECONDS
from laplace_hfl.engine.refit import RefitSettings
from laplace_hfl.engine.solver_objects import solver_names
from laplace_hfl.engine.validation import MAX_EPS, as_bool, as_int, as_number

__all__ = [
    "HFLOptions",
    "OPTION_NAMES",
    "SOLVERS",
    "PRECONDITIONERS",
    "validate_hfl_options",
    "hfl_signature",
    "constructor_arguments",
]


@dataclass(frozen=True)
class HFLOptions:
    """The keyword-only HFL options of a constructor, with their defaults.

    Documented for users in :data:`laplace_hfl._docs.HFL_OPTIONS_DOC`; built
    checked by :func:`validate_hfl_options`.
    """

    eps: float = 1e-3
    target: str = "ggn"
    rtol: float = 1e-6
    max_iter: int = 1000
    max_newton: int = 20
    chunk_size: int | str = "auto"
    compute_dtype: torch.dtype | str = "auto"
    progress_bar: bool = False
    amortize: int | None = None
    amortize_deflation: int | None = None
    precondition_rank: int | None = None
    minibatch_epochs: int | None = None
    solver: str = "auto"
    preconditioner: str = "auto"

    @property
    def settings(self) -> RefitSettings:
        """The numerical settings of the refits."""
        return RefitSettings(
            self.target, self.eps, self.rtol, self.max_iter, self.max_newton
        )


#: The option names, in signature order.
OPTION_NAMES = tuple(f.name for f in dataclasses.fields(HFLOptions))
SOLVERS = ("auto", *solver_names())  # as registered at import
PRECONDITIONERS = ("auto", *_PRECONDS)

_Init = TypeVar("_Init", bound=Callable[..., None])


def hfl_signature(parent: type) -> Callable[[_Init], _Init]:
    """Decorator: show a constructor ``__init__(self, *args, **kwargs)`` with
    the signature users call, ``parent.__init__``'s (laplace-torch's
    arguments) followed by one keyword-only parameter per :class:`HFLOptions`
    field with its default and type (what ``inspect.signature`` and ``help``
    show)."""

    def decorate(init: _Init) -> _Init:
        sig = inspect.signature(parent.__init__)
        params = [*sig.parameters.values()] + [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                              default=f.default, annotation=f.type)
            for f in dataclasses.fields(HFLOptions)
        ]  # fmt: skip
        init.__signature__ = sig.replace(parameters=params, return_annotation=None)  # type: ignore[attr-defined]
        return init

    return decorate


def constructor_arguments(
    parent: type, owner: str, args: tuple, kwargs: dict[str, Any]
) -> tuple[dict[str, Any], HFLOptions]:
    """Split and check a constructor call of the signature :func:`hfl_signature`
    shows.

    Parameters
    ----------
    parent : type
        The laplace-torch class whose ``__init__`` takes the other arguments.
    owner : str
        The constructor's class name, for the message of a wrong call.
    args, kwargs
        The call's positional and keyword arguments (without ``self``).

    Returns
    -------
    dict
        ``parent``'s arguments by name, defaults filled in.
    HFLOptions
        The checked options (:func:`validate_hfl_options`).

    Raises
    ------
    TypeError
        A call that does not fit the signature, as Python words it.
    ValueError, NotImplementedError
        As :func:`validate_hfl_options`.
    """
    options = {k: v for k, v in kwargs.items() if k in OPTION_NAMES}
    rest = {k: v for k, v in kwargs.items() if k not in OPTION_NAMES}
    try:
        bound = inspect.signature(parent.__init__).bind(None, *args, **rest)
    except TypeError as err:
        raise TypeError(f"{owner}.__init__() {err}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments[next(iter(arguments))]  # self
    checked = validate_hfl_options(
        arguments["likelihood"], arguments["enable_backprop"], options
    )
    return arguments, checked


def validate_hfl_options(
    likelihood: str,
    enable_backprop: bool,
    options: Mapping[str, Any],
) -> HFLOptions:
    """The checked options from the keywords a constructor received.

    Parameters
    ----------
    likelihood : str
    enable_backprop : bool
    options : mapping
        Keyword options by name; missing ones take their defaults.

    Returns
    -------
    HFLOptions

    Raises
    ------
    TypeError
        A name that is not an option.
    ValueError, NotImplementedError
        A value out of range, or a combination the estimator does not support.
    """
    unknown = [name for name in options if name not in OPTION_NAMES]
    if unknown:
        raise TypeError(
            f"{unknown[0]!r} is not an HFL option; they are {OPTION_NAMES}."
        )
    o = dataclasses.replace(HFLOptions(), **options)
    solver, preconditioner = o.solver, o.preconditioner
    amortize, minibatch_epochs = o.amortize, o.minibatch_epochs
    precondition_rank, target = o.precondition_rank, o.target
    solvers = ("auto", *solver_names())  # the registry now
    if not (isinstance(solver, str) and solver in solvers):
        raise ValueError(
            f"solver must be one of {solvers}, got {solver!r}: 'auto' solves "
            "densely (one Cholesky factor) when the refit curvature fits half "
            "the free memory and a probe estimates it faster than conjugate "
            "gradients, else by conjugate gradients."
        )
    preconds = ("auto", *_PRECONDS)  # the registry now
    if not (isinstance(preconditioner, str) and preconditioner in preconds):
        raise ValueError(
            f"preconditioner must be one of {preconds}, got "
            f"{preconditioner!r}: 'auto' probes the candidates (Nystrom sketch, "
            "KFAC where it covers every refit parameter, none) with a few CG "
            "iterations and keeps the fastest."
        )
    if solver == "dense" and (amortize is not None or minibatch_epochs is not None):
        raise ValueError(
            "solver='dense' cannot be combined with amortize or minibatch_epochs "
            "(those modes never form the curvature); use solver='auto'."
        )
    if preconditioner in ("kfac", "none") and precondition_rank not in (None, 0):
        raise ValueError(
            f"precondition_rank={precondition_rank!r} sets the rank of the Nystrom "
            f"sketch, which preconditioner={preconditioner!r} does not use; use "
            "preconditioner='nystrom' or 'auto', or leave precondition_rank=None."
        )
    if likelihood not in ("regression", "classification", "reward_modeling"):
        raise ValueError(
            f"HFL supports likelihood='regression', 'classification' or "
            f"'reward_modeling', not {likelihood!r}."
        )
    clean: dict[str, Any] = {"eps": as_number("eps", o.eps)}
    if not (0 < clean["eps"] <= MAX_EPS):
        raise ValueError(
            f"eps must be in (0, {MAX_EPS}], got {clean['eps']!r}: it is the "
            "perturbation in posterior standard deviations (default 1e-3)."
        )
    clean["rtol"] = as_number("rtol", o.rtol)
    if not (0 < clean["rtol"] < 1):
        raise ValueError(
            f"rtol must be in (0, 1), got {clean['rtol']!r}: it is the relative "
            "residual at which a refit counts as converged (default 1e-6)."
        )
    for name in ("max_iter", "max_newton"):
        clean[name] = as_int(name, getattr(o, name), 1)
    if not (isinstance(o.chunk_size, str) and o.chunk_size == "auto"):
        try:
            clean["chunk_size"] = as_int("chunk_size", o.chunk_size, 1)
        except ValueError as err:
            raise ValueError(
                f"{err} ('auto', the default, sizes it from the device's free "
                "memory at fit.)"
            ) from None
    clean["progress_bar"] = as_bool("progress_bar", o.progress_bar)
    if minibatch_epochs is not None:
        minibatch_epochs = _option_int("minibatch_epochs", minibatch_epochs, 2)
    if amortize is not None:
        amortize = _option_int("amortize", amortize, 2)
    if precondition_rank is not None:
        precondition_rank = _option_int("precondition_rank", precondition_rank, 0)
    deflation = o.amortize_deflation
    if deflation is not None:
        deflation = _option_int("amortize_deflation", deflation, 0)
        if deflation > 0 and amortize is None:
            raise ValueError(
                f"amortize_deflation={deflation} deflates the amortised samples, "
                "but amortize=None (exact HFL has no samples): set amortize=S, "
                "or leave amortize_deflation=None."
            )
        if precondition_rank is not None and deflation > precondition_rank > 0:
            raise ValueError(
                f"amortize_deflation={deflation} exceeds precondition_rank="
                f"{precondition_rank}: it deflates the top directions of the "
                "Nystrom sketch, so use at most the sketch's rank."
            )
    clean.update(
        minibatch_epochs=minibatch_epochs,
        amortize=amortize,
        amortize_deflation=deflation,
        precondition_rank=precondition_rank,
    )
    if enable_backprop and amortize is not None:
        raise NotImplementedError(
            "enable_backprop=True (gradients of the predictive w.r.t. inputs) "
            "is available for exact HFL only; use amortize=None."
        )
    if minibatch_epochs is not None and target != "ggn":
        raise ValueError(
            "minibatch_epochs (minibatch refits) is available for "
            "target='ggn' only: the network refit (target='hessian') needs "
            "full-batch Newton steps."
        )
    if not (
        (isinstance(o.compute_dtype, str) and o.compute_dtype == "auto")
        or o.compute_dtype in (torch.float32, torch.float64)
    ):
        raise ValueError(
            f"compute_dtype must be 'auto' (default: by device, model dtype and "
            f"tolerance), torch.float64 or torch.float32, got {o.compute_dtype!r}."
        )
    if amortize is not None and target != "ggn":
        raise ValueError(
            "amortize is only available with target='ggn': the amortised "
            "mode draws posterior samples by perturbed refits of the "
            "linearised network (sample-then-optimise), which needs a "
            "square root of the curvature that the exact Hessian lacks. "
            "Use target='ggn', or amortize=None for exact Hessian refits."
        )
    o = dataclasses.replace(o, **clean)
    o.settings  # noqa: B018  (RefitSettings checks the target's name)
    return o


def _option_int(name: str, value: object, minimum: int) -> int:
    """``as_int`` whose message also says what ``None`` means for ``name``."""
    try:
        return as_int(name, value, minimum)
    except ValueError as err:
        raise ValueError(f"{err} ({name}=None switches it off.)") from None


# ------------------------------------------------- quantities from chunk_size
