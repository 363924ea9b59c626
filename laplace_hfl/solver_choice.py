"""Which solver and preconditioner objects a refit uses; keeps them for one fit.

:class:`SolverMixin` is part of the HFL shell (:class:`laplace_hfl.base.HFLMixin`).
It picks names from the registries of :mod:`laplace_hfl.engine.solver_objects`
and :mod:`laplace_hfl.engine.precond_objects`, keeps the objects (each owns
its cache) and calls them with a :class:`~laplace_hfl.engine.solver_objects.SolveContext`
of the estimator's current values:

* ``solver="auto"`` and ``preconditioner="auto"`` are decided once per fit
  by a probe of the user's problem (:func:`laplace_hfl.engine.auto_choice.choose`):
  each candidate preconditioner (the Nyström sketch, rank
  ``precondition_rank`` or one grown while its cost is repaid; KFAC
  (:mod:`laplace_hfl.engine.kfac`) where it covers every refit parameter; none)
  runs a few CG iterations on the refit system, the fewest iterations wins;
  the dense solver
  (:mod:`laplace_hfl.engine.dense`: one Cholesky factor per prior, reused by every
  query, grid-search step and prediction) is chosen where it fits half the
  device's free memory and its measured-rate estimate beats three chunks of CG
  refits. Setting ``precondition_rank`` with ``preconditioner="auto"``
  selects the Nyström sketch (``0``: none), as before this option existed.
  Amortised and minibatch modes keep their own paths (the Nyström sketch).

The data curvature (dense ``G``, KFAC factors, Nyström sketch) is computed once
per fit (a fit, or a loaded state, starts with new objects); only its combination with the prior precision, ``sigma_noise`` and the
temperature is redone when those change. The choice made is recorded in
``la.last_diagnostics.solver`` / ``.preconditioner``, and why in
``la.last_diagnostics.choice``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from laplace_hfl.engine.amortized import AmortizedState
from laplace_hfl.engine.auto_choice import AutoChoice, choose, sketch_levels
from laplace_hfl.engine.batches import eval_mode
from laplace_hfl.engine.chunks import sketch_columns
from laplace_hfl.engine.dense import (
    DenseFactor,
    dense_fits,
    linear_layer_covariance,
    query_rows,
)
from laplace_hfl.engine.example_noise import batch_noise
from laplace_hfl.engine.functional import LaplaceObjective, ParamLayout
from laplace_hfl.engine.precond_objects import (
    PRECONDITIONERS,
    NystromPreconditioner,
    PreconditionerMethod,
    PrecondSetup,
)
from laplace_hfl.engine.preconditioner import default_rank
from laplace_hfl.engine.refit import BasePoint
from laplace_hfl.engine.solver_objects import (
    SOLVERS,
    AmortizedSampling,
    DenseCholesky,
    SolveContext,
    Solver,
)

__all__ = ["SolverMixin"]


class SolverMixin:
    """Solver and preconditioner choice; keeps the chosen objects (one fit)."""

    def _reset_solver_caches(self) -> None:
        self._solver_object: Solver | None = None
        self._preconds: dict[str, PreconditionerMethod] = {}
        self._auto_choice: AutoChoice | None = None
        self._auto_rank: int | None = None

    # ------------------------------------------------------------------ auto
    def _classic(self) -> bool:
        return self.amortize is None and self.minibatch_epochs is None

    def _auto(self, obj: LaplaceObjective | None = None) -> AutoChoice | None:
        """The probe's choice (once per fit) where ``solver="auto"`` or
        ``preconditioner="auto"`` leave something to decide, else ``None``."""
        probe_solver = self.solver == "auto"
        probe_precond = (
            self.solver == "cg"
            and self.preconditioner == "auto"
            and self.precondition_rank is None
        )
        if not self._classic() or not (probe_solver or probe_precond):
            return None
        if self._auto_choice is None:
            obj = self._objective() if obj is None else obj
            n_outputs = self._outputs_per_point()
            P = obj.theta_map.numel()
            candidates = self._precond_candidates(obj)
            levels = ()
            if (
                "nystrom" in candidates
                and self.preconditioner == "auto"
                and self.precondition_rank is None
            ):
                levels = sketch_levels(
                    P, self._rank(P), self._n_rows(), self.chunk_size
                )
            try:
                choice = choose(
                    obj,
                    candidates,
                    build_products={"nystrom": self._rank(P), "kfac": n_outputs},
                    rtol=self.hfl_settings.rtol,
                    target=self.hfl_settings.target,
                    allow_dense=probe_solver,
                    workload=self.chunk_size,
                    n_outputs=n_outputs,
                    n_rows=self._n_rows(),
                    levels=levels,
                    sketch_at=partial(self._sketch_at, obj, max(levels, default=0)),
                )
            finally:  # the columns kept for growing, also after a failed probe
                nystrom = self._preconds.get("nystrom")
                if isinstance(nystrom, NystromPreconditioner):
                    nystrom.release()
            if choice.rank:
                self._auto_rank = choice.rank
            self._auto_choice = choice
        return self._auto_choice

    def _sketch_at(
        self, obj: LaplaceObjective, capacity: int, rank: int
    ) -> tuple[Callable[[Tensor], Tensor], Tensor, float]:
        """The Nyström candidate at ``rank`` of the automatic rank's levels
        (columns kept up to ``capacity``), its eigenvalues and the seconds
        of its eigendecomposition."""
        method = self._precond_object("nystrom")
        setup = replace(self._precond_setup(obj.theta_map.numel()), rank=rank)
        method.build_level(obj, setup, capacity)
        pre = method.apply(obj.h_factor, obj.prior_precision)
        return pre, method.sketch.lam, method.seconds

    def _outputs_per_point(self) -> int:
        """``C``, the outputs per data point (1 before a fit)."""
        return max(int(getattr(self, "n_outputs", 1) or 1), 1)

    def _n_rows(self) -> int:
        """``N C``, the training outputs of the fit (the GGN's largest rank;
        0 before a fit)."""
        return int(getattr(self, "n_data", 0) or 0) * self._outputs_per_point()

    def _choice_reason(self) -> str:
        choice = self._auto() if self._classic() else None
        if choice is not None:
            reason = choice.reason
        else:
            reason = (
                f"set: solver={self.solver!r}, preconditioner={self.preconditioner!r}"
            )
        # what compute_dtype="auto" and chunk_size="auto" chose, and why
        return "; ".join([reason, *self.auto_choices.values()])

    # ----------------------------------------------------------------- solver
    def _solver_name(self, obj: LaplaceObjective | None = None) -> str:
        """The registry name of the solver in use: the modes ``amortize`` and
        ``minibatch_epochs`` first, then ``solver`` (``"auto"``: the probe's)."""
        if self.amortize is not None:
            return "amortized"
        if self.minibatch_epochs is not None:
            return "minibatch"
        if self.solver != "auto":
            return self.solver
        return self._auto(obj).solver

    def _solver(self, obj: LaplaceObjective | None = None) -> Solver:
        """The solver object in use (one per fit, with its caches)."""
        name = self._solver_name(obj)
        if self._solver_object is None or self._solver_object.name != name:
            self._solver_object = SOLVERS[name]()
        return self._solver_object

    def _solve_context(self) -> SolveContext:
        """What the solver objects read from this estimator, now."""
        return SolveContext(
            key=self._hyper_key(),
            settings=self.hfl_settings,
            chunk_size=self.chunk_size,
            progress_bar=self.progress_bar,
            preconditioner=self._preconditioner,
            choice=self._choice_reason,
            n_data=getattr(self, "n_data", 0),
            batch_rows=self._minibatch_rows,
            epochs=self.minibatch_epochs,
            n_samples=self.amortize,
            noise=lambda: batch_noise(self._training_index, self._training_data),
            has_data=self._training_data is not None or self._train_loader is not None,
            deflation=self.amortize_deflation or 0,
        )

    def _solve(self, obj: LaplaceObjective, V: Tensor) -> Tensor:
        """``P^{-1} v`` estimates for the rows of ``V`` by the solver in use."""
        U, diag = self._solver(obj).solve(obj, V, self._solve_context())
        if diag is not None:
            self.last_diagnostics = diag
        return U

    def _base_point(self, obj: LaplaceObjective) -> BasePoint | None:
        """Where the solver's refits start (``None``: the MAP)."""
        return self._solver(obj).base_point(obj, self._solve_context())

    def _uses_dense(self, n_params: int, obj: LaplaceObjective | None = None) -> bool:
        return isinstance(self._solver(obj), DenseCholesky)

    def _query_step(self, obj: LaplaceObjective, n_outputs: int) -> int:
        """Query points per prediction chunk: ``chunk_size`` directions for the
        refits; for the dense solver as many as its memory budget allows.

        Called before the prediction loop, it also does the solves' one-time
        work (the probe of ``"auto"``; the dense factor, or the preconditioner
        and the refits' base point), so that the first
        chunk's time predicts the others' (the progress estimate).
        """
        solver = self._solver(obj)
        return solver.query_step(obj, n_outputs, self._solve_context())

    def _amortized_state(self, obj: LaplaceObjective) -> AmortizedState:
        """Posterior samples for the current hyperparameters (built once)."""
        return self._solver(obj).samples(self._solve_context(), lambda: obj)

    @property
    def _amortized(self) -> AmortizedState | None:
        """The amortised samples held (``None``: none drawn or loaded)."""
        stored = self._stored_samples()
        return None if stored is None else stored[0]

    def _stored_samples(self) -> tuple[AmortizedState, tuple] | None:
        """The amortised samples held and the hyperparameter key they were
        drawn for (``state_dict``)."""
        solver = self.__dict__.get("_solver_object")
        return solver.stored() if isinstance(solver, AmortizedSampling) else None

    def _restore_samples(self, state: AmortizedState, key: tuple) -> None:
        """Hold loaded amortised samples drawn for the hyperparameter ``key``."""
        solver = self._solver()
        solver.restore(state, key, int(self.amortize))

    def _dense(self, obj: LaplaceObjective | None = None) -> DenseFactor:
        """The Cholesky factor of ``h C + diag(p_0)`` of the dense solver,
        cached per hyperparameters (``C`` cached per fit for ``"ggn"``).

        ``obj`` is built (:meth:`_objective`, which checks the
        hyperparameters) only when the factor has to be formed; a cached
        factor's key equals the values checked when it was formed.
        """
        objective = self._objective if obj is None else (lambda: obj)
        return self._solver(obj).factor(self._solve_context(), objective)

    def _dense_ggn(self, obj: LaplaceObjective) -> Tensor:
        """The data GGN of the dense solver, formed once per fit (at ``fit``
        where :meth:`_fit_curvature` applies) and shared by the solves, the
        samples and the marginal likelihood."""
        with eval_mode(self.model):
            return self._solver(obj).data_curvature(
                obj, self.hfl_settings.curvature, self.progress_bar
            )

    def _fit_curvature(self) -> None:
        """The solves' one-time work done by ``fit``, as FullLaplace forms its
        GGN there: the probe of ``"auto"`` and, where the dense solver is used
        on a curvature that does not depend on the prior (the GGN at the MAP),
        the data curvature, so that the first ``sample``, ``pred_type="nn"``
        call or prediction only factorises.

        Left to the first solve where it could be wasted or is not
        prior-independent: ``solver="cg"``, a dense solver that does not fit
        in memory (CG for sure), ``target="hessian"`` (curvature at the
        prior's base point), amortised and minibatch modes (their own
        fit-time work) and distributed fits (collective work stays in the
        calls every rank makes together).
        """
        if (
            not self._classic()
            or self.solver == "cg"
            or self.hfl_settings.curvature.at_base_point
        ):
            return
        P = int(self.mean.numel())
        like = torch.empty(0, device=self._device, dtype=self.compute_dtype)
        if self.solver == "auto" and not dense_fits(P, like=like):
            return
        with eval_mode(self.model):
            obj = self._objective()
            if obj.reduce is None and self._uses_dense(P, obj):  # not distributed
                self._dense_ggn(obj)

    def _dense_linear_predictive(
        self, module: nn.Linear, features: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Mean and ``J Sigma J^T`` per input for a ``Linear`` refit module
        from its inputs (:func:`~laplace_hfl.engine.dense.linear_layer_covariance`).

        The reordered ``Sigma`` is cached per factor, and the objective is
        built only when the factor has to be formed (:meth:`_dense`): a
        prediction with the factor of the current hyperparameters costs the
        features' two contractions with ``Sigma`` and one ``Linear`` forward,
        in chunks of the dense budget.
        """
        self._check_fit_likelihood()
        solver, ctx = self._solver(), self._solve_context()
        factor = solver.factor(ctx, self._objective)
        C, D, bias = module.out_features, module.in_features, module.bias is not None
        order = solver.linear_order(ctx, self._objective, (C, D, bias))
        step = query_rows(order.shape[1] * C, C)
        covs = [
            linear_layer_covariance(order, features[i : i + step], C, bias)
            for i in range(0, features.shape[0], step)
        ]
        cov = covs[0] if len(covs) == 1 else torch.cat(covs)
        self.last_diagnostics = solver.diagnostics(
            factor, features.shape[0] * C, cov, ctx
        )
        theta = self.mean.detach().to(features)  # the MAP, as the refits see it
        W, b = theta[: C * D].reshape(C, D), theta[C * D :] if bias else None
        return torch.nn.functional.linear(features, W, b), cov

    # --------------------------------------------------------- preconditioner
    def _rank(self, n_params: int) -> int:
        """``precondition_rank``, or the automatic rank decided once per fit
        (on CUDA it reads the free memory, which the sketch itself then takes:
        read again, it would shrink and rebuild the sketch on every solve).

        The automatic rank is at most ``N C``, the GGN's largest possible
        rank: a sketch of more columns costs more products and resolves
        nothing more."""
        rank = self.precondition_rank
        if rank is None:
            if getattr(self, "_auto_rank", None) is None:
                like = torch.empty(0, device=self._device, dtype=self.compute_dtype)
                rank = default_rank(n_params, like)
                n_rows = self._n_rows()
                self._auto_rank = min(rank, n_rows) if n_rows > 0 else rank
            rank = self._auto_rank
        return min(rank, n_params)

    def _precond_setup(self, n_params: int) -> PrecondSetup:
        return PrecondSetup(
            self._rank(n_params),
            sketch_columns(self.chunk_size),
            self._refit_module_to_copy,
        )

    def _refit_module_to_copy(self) -> tuple[nn.Module, ParamLayout, Any]:
        """The refit module for a preconditioner that copies it (KFAC): its
        hooks may hold a tensor of a finished torch.func transform (the
        last-layer extractor's features after a probe's products), released
        first."""
        self._release_transients()
        return self._refit_module()

    def _precond_names(self, n_params: int) -> list[str]:
        """Candidate preconditioners, in probe order (the registry's): every
        available one for ``"auto"`` of the full-batch solvers; the Nyström
        sketch (or none at rank 0) where ``precondition_rank`` is set or in
        the amortised and minibatch modes; else the one set."""
        choice = self.preconditioner
        setup = self._precond_setup(n_params)
        if choice == "auto" and self.precondition_rank is None and self._classic():
            return [n for n, cls in PRECONDITIONERS.items() if cls.available(setup)]
        if choice in ("auto", "nystrom"):
            return ["nystrom"] if setup.rank > 0 else ["none"]
        return [choice]

    def _precond_candidates(
        self, obj: LaplaceObjective
    ) -> dict[str, Callable[[], Callable[[Tensor], Tensor] | None]]:
        names = self._precond_names(obj.theta_map.numel())
        return {n: (lambda n=n: self._build_precond(obj, n)) for n in names}

    def _precond_choice(self, obj: LaplaceObjective) -> tuple[str, int]:
        """``(name, nystrom_rank)`` of the preconditioner for this refit."""
        P = obj.theta_map.numel()
        names = self._precond_names(P)
        choice = self._auto(obj) if len(names) > 1 else None
        name = choice.preconditioner if choice is not None else names[0]
        return name, (self._rank(P) if name == "nystrom" else 0)

    def _precond_object(self, name: str) -> PreconditionerMethod:
        """Preconditioner object ``name`` of this fit (made on first use)."""
        method = self._preconds.get(name)
        if method is None:
            method = self._preconds[name] = PRECONDITIONERS[name]()
        return method

    def _built_precond(self, obj: LaplaceObjective, name: str) -> PreconditionerMethod:
        """Preconditioner object ``name`` with its data part (KFAC factors,
        Nyström sketch) built, once per fit."""
        method = self._precond_object(name)
        method.build(obj, self._precond_setup(obj.theta_map.numel()))
        return method

    def _build_precond(
        self, obj: LaplaceObjective, name: str
    ) -> Callable[[Tensor], Tensor] | None:
        """Preconditioner ``name`` for the current hyperparameters."""
        return self._built_precond(obj, name).apply(obj.h_factor, obj.prior_precision)

    def _preconditioner(self, obj: LaplaceObjective) -> PreconditionerMethod:
        """The chosen preconditioner object, built (it knows its name)."""
        return self._built_precond(obj, self._precond_choice(obj)[0])

    def _precond(self, obj: LaplaceObjective) -> Callable[[Tensor], Tensor] | None:
        """The preconditioner of the CG solves for the current hyperparameters.

        Its data part (KFAC factors or Nyström sketch) is built once per fit
        (it does not depend on the prior, ``sigma_noise`` or the temperature).
        """
        return self._build_precond(obj, self._precond_choice(obj)[0])
