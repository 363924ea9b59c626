"""Validation of the keyword-only HFL options of the two estimator classes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from laplace_hfl.engine.precond_objects import PRECONDITIONERS as _PRECONDS
from laplace_hfl.engine.refit import RefitSettings
from laplace_hfl.engine.solver_objects import solver_names
from laplace_hfl.engine.validation import MAX_EPS, as_bool, as_int, as_number

__all__ = ["HFLOptions", "SOLVERS", "PRECONDITIONERS", "validate_hfl_options"]


@dataclass(frozen=True)
class HFLOptions:
    """The validated keyword-only HFL options of a constructor."""

    settings: RefitSettings
    chunk_size: int
    compute_dtype: torch.dtype
    progress_bar: bool
    amortize: int | None
    precondition_rank: int | None
    minibatch_epochs: int | None
    solver: str = "auto"
    preconditioner: str = "auto"


SOLVERS = ("auto", *solver_names())  # as registered at import
PRECONDITIONERS = ("auto", *_PRECONDS)


def validate_hfl_options(
    likelihood: str,
    enable_backprop: bool,
    *,
    eps: float,
    target: str,
    rtol: float,
    max_iter: int,
    max_newton: int,
    chunk_size: int,
    compute_dtype: torch.dtype,
    progress_bar: bool,
    amortize: int | None,
    precondition_rank: int | None,
    minibatch_epochs: int | None,
    solver: str = "auto",
    preconditioner: str = "auto",
) -> HFLOptions:
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
    eps = as_number("eps", eps)
    if not (0 < eps <= MAX_EPS):
        raise ValueError(
            f"eps must be in (0, {MAX_EPS}], got {eps!r}: it is the perturbation "
            "in posterior standard deviations (default 1e-3)."
        )
    rtol = as_number("rtol", rtol)
    if not (0 < rtol < 1):
        raise ValueError(
            f"rtol must be in (0, 1), got {rtol!r}: it is the relative residual "
            "at which a refit counts as converged (default 1e-6)."
        )
    max_iter = as_int("max_iter", max_iter, 1)
    max_newton = as_int("max_newton", max_newton, 1)
    chunk_size = as_int("chunk_size", chunk_size, 1)
    progress_bar = as_bool("progress_bar", progress_bar)
    if minibatch_epochs is not None:
        minibatch_epochs = _option_int("minibatch_epochs", minibatch_epochs, 2)
    if amortize is not None:
        amortize = _option_int("amortize", amortize, 2)
    if precondition_rank is not None:
        precondition_rank = _option_int("precondition_rank", precondition_rank, 0)
    if enable_backprop and amortize is not None:
        raise NotImplementedError(
            "enable_backprop=True (gradients of the predictive w.r.t. inputs) "
            "is available for exact HFL only; use amortize=None."
        )
    if minibatch_epochs is not None:
        if isinstance(minibatch_epochs, bool) or not (
            isinstance(minibatch_epochs, int) and minibatch_epochs >= 2
        ):
            raise ValueError(
                "minibatch_epochs must be None (full-batch CG refits) or the "
                f"number of epochs (an integer >= 2), got {minibatch_epochs!r}."
            )
        if target != "ggn":
            raise ValueError(
                "minibatch_epochs (minibatch refits) is available for "
                "target='ggn' only: the network refit (target='hessian') needs "
                "full-batch Newton steps."
            )
    if precondition_rank is not None and not (
        isinstance(precondition_rank, int)
        and not isinstance(precondition_rank, bool)
        and precondition_rank >= 0
    ):
        raise ValueError(
            "precondition_rank must be None (automatic), 0 (no preconditioner) "
            f"or a positive integer, got {precondition_rank!r}."
        )
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"compute_dtype must be torch.float64 (default) or torch.float32, "
            f"got {compute_dtype}."
        )
    if amortize is not None:
        if isinstance(amortize, bool) or not (
            isinstance(amortize, int) and amortize >= 2
        ):
            raise ValueError(
                f"amortize must be None or the number of posterior samples "
                f"(an integer >= 2), got {amortize!r}."
            )
        if target != "ggn":
            raise ValueError(
                "amortize is only available with target='ggn': the amortised "
                "mode draws posterior samples by perturbed refits of the "
                "linearised network (sample-then-optimise), which needs a "
                "square root of the curvature that the exact Hessian lacks. "
                "Use target='ggn', or amortize=None for exact Hessian refits."
            )
    return HFLOptions(
        RefitSettings(target, eps, rtol, max_iter, max_newton),
        chunk_size,
        compute_dtype,
        progress_bar,
        amortize,
        precondition_rank,
        minibatch_epochs,
        solver,
        preconditioner,
    )


def _option_int(name: str, value: object, minimum: int) -> int:
    """``as_int`` whose message also says what ``None`` means for ``name``."""
    try:
        return as_int(name, value, minimum)
    except ValueError as err:
        raise ValueError(f"{err} ({name}=None switches it off.)") from None
