"""Which solver and which preconditioner a refit uses, and their caches.

:class:`SolverMixin` is part of the HFL shell (:class:`laplace_hfl.base.HFLMixin`):

* ``solver="auto"`` and ``preconditioner="auto"`` are decided once per fit
  by a probe of the user's problem (:func:`laplace_hfl.engine.auto_choice.choose`):
  each candidate preconditioner (the Nyström sketch, rank
  ``precondition_rank`` or its default; KFAC (:mod:`laplace_hfl.engine.kfac`) where
  it covers every refit parameter; none) runs a few CG iterations on the
  refit system, the fewest iterations wins; the dense solver
  (:mod:`laplace_hfl.engine.dense`: one Cholesky factor per prior, reused by every
  query, grid-search step and prediction) is chosen where it fits half the
  device's free memory and its measured-rate estimate beats one chunk of CG
  refits. Setting ``precondition_rank`` with ``preconditioner="auto"``
  selects the Nyström sketch (``0``: none), as before this option existed.
  Amortised and minibatch modes keep their own paths (the Nyström sketch).

The data curvature (dense ``G``, KFAC factors, Nyström sketch) is computed once
per fit; only its combination with the prior precision, ``sigma_noise`` and the
temperature is redone when those change. The choice made is recorded in
``la.last_diagnostics.solver`` / ``.preconditioner``, and why in
``la.last_diagnostics.choice``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from laplace_hfl.engine.auto_choice import AutoChoice, choose
from laplace_hfl.engine.batches import eval_mode
from laplace_hfl.engine.dense import (
    DenseFactor,
    data_ggn,
    data_hessian,
    dense_base_point,
    dense_fits,
    factorize,
    linear_layer_covariance,
    linear_layer_order,
    query_rows,
)
from laplace_hfl.engine.functional import LaplaceObjective
from laplace_hfl.engine.kfac import kfac_apply, kfac_factors, kfac_supported
from laplace_hfl.engine.preconditioner import (
    default_rank,
    nystrom_apply,
    nystrom_sketch,
)
from laplace_hfl.engine.refit import RefitDiagnostics
from laplace_hfl.options import hessian_rows, query_points, sketch_columns

__all__ = ["SolverMixin"]


class SolverMixin:
    """Solver and preconditioner choice with per-fit caches (see module doc)."""

    def _reset_solver_caches(self) -> None:
        self._sketch = None
        self._sketch_rank: int | None = None
        self._kfac = None
        self._dense_curv = None
        self._dense_curv_key: tuple | None = None
        self._dense_factor = None
        self._dense_key: tuple | None = None
        self._dense_linear = None
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
            n_outputs = max(int(getattr(self, "n_outputs", 1) or 1), 1)
            P = obj.theta_map.numel()
            self._auto_choice = choose(
                obj,
                self._precond_candidates(obj),
                build_products={"nystrom": self._rank(P), "kfac": n_outputs},
                rtol=self.hfl_settings.rtol,
                target=self.hfl_settings.target,
                allow_dense=probe_solver,
                workload=self.chunk_size,
                n_outputs=n_outputs,
                n_rows=int(self.n_data) * n_outputs,
            )
        return self._auto_choice

    def _choice_reason(self) -> str:
        choice = self._auto() if self._classic() else None
        if choice is not None:
            return choice.reason
        return f"set: solver={self.solver!r}, preconditioner={self.preconditioner!r}"

    # ----------------------------------------------------------------- solver
    def _uses_dense(self, n_params: int, obj: LaplaceObjective | None = None) -> bool:
        if not self._classic():
            return False
        if self.solver != "auto":
            return self.solver == "dense"
        return self._auto(obj).solver == "dense"

    def _query_step(self, obj: LaplaceObjective, n_outputs: int) -> int:
        """Query points per prediction chunk: ``chunk_size`` directions for the
        refits; for the dense solver as many as its memory budget allows.

        Called before the prediction loop, it also does the solves' one-time
        work (the probe of ``"auto"``; the dense factor, or the preconditioner
        and the refits' base point), so that the first
        chunk's time predicts the others' (the progress estimate).
        """
        if self._uses_dense(obj.theta_map.numel(), obj):
            self._dense(obj)
            return query_rows(obj.theta_map.numel(), max(n_outputs, 1))
        if self._classic():
            self._base_point(obj)  # builds the preconditioner too
        return query_points(self.chunk_size, n_outputs)

    def _dense(self, obj: LaplaceObjective | None = None) -> DenseFactor:
        """The Cholesky factor of ``h C + diag(p_0)``, cached per
        hyperparameters (``C`` cached per fit for ``"ggn"``).

        ``obj`` is built (:meth:`_objective`, which checks the
        hyperparameters) only when the factor has to be formed; a cached
        factor's key equals the values checked when it was formed.
        """
        target = self.hfl_settings.target
        key = self._hyper_key()
        if self._dense_factor is None or self._dense_key != key:
            obj = self._objective() if obj is None else obj
            if target == "ggn":
                curv = self._dense_ggn(obj)
            else:  # the exact Hessian at the refit's base point (depends on prior)
                theta = self._base_point(obj).theta
                curv = data_hessian(
                    obj, theta, hessian_rows(self.chunk_size), self.progress_bar
                )
            self._dense_factor = factorize(
                curv, obj.h_factor, obj.prior_precision, target
            )
            self._dense_key = key
            self._dense_linear = None
            if target == "ggn":  # records how stationary the MAP is
                self._base = dense_base_point(obj, self._dense_factor)
                self._base_key = key
        return self._dense_factor

    def _dense_ggn(self, obj: LaplaceObjective) -> Tensor:
        """The data GGN of the dense solver, formed once per fit (at ``fit``
        where :meth:`_fit_curvature` applies) and shared by the solves, the
        samples and the marginal likelihood."""
        if self._dense_curv is None:
            with eval_mode(self.model):
                self._dense_curv = data_ggn(obj, progress_bar=self.progress_bar)
        return self._dense_curv

    def _fit_curvature(self) -> None:
        """The solves' one-time work done by ``fit``, as FullLaplace forms its
        GGN there: the probe of ``"auto"`` and, where the dense solver is used
        with ``target="ggn"``, the data GGN (independent of the prior,
        ``sigma_noise`` and the temperature), so that the first ``sample``,
        ``pred_type="nn"`` call or prediction only factorises.

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
            or self.hfl_settings.target != "ggn"
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

    def _dense_diagnostics(self, factor: DenseFactor, m: int, like: Tensor) -> None:
        residual = like.new_full((2, m), factor.residual)
        self.last_diagnostics = RefitDiagnostics(
            eps=like.new_zeros(m),
            residual=residual,
            iterations=torch.zeros(2, m, dtype=torch.long, device=like.device),
            converged=residual <= self.hfl_settings.rtol,
            solver="dense",
            preconditioner="none",
            choice=self._choice_reason(),
        )

    def _dense_solve(self, obj: LaplaceObjective, V: Tensor) -> Tensor:
        """``(h C + diag(p_0))^{-1} v`` for the rows of ``V`` by one Cholesky
        factor (:meth:`_dense`)."""
        factor = self._dense(obj)
        U = factor.solve(V)
        self._dense_diagnostics(factor, V.shape[0], V)
        return U

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
        factor = self._dense()
        C, D, bias = module.out_features, module.in_features, module.bias is not None
        if self._dense_linear is None:
            self._dense_linear = linear_layer_order(factor.Sigma, C, D, bias)
        step = query_rows(self._dense_linear.shape[1] * C, C)
        covs = [
            linear_layer_covariance(self._dense_linear, features[i : i + step], C, bias)
            for i in range(0, features.shape[0], step)
        ]
        cov = covs[0] if len(covs) == 1 else torch.cat(covs)
        self._dense_diagnostics(factor, features.shape[0] * C, cov)
        theta = self.mean.detach().to(features)  # the MAP, as the refits see it
        W, b = theta[: C * D].reshape(C, D), theta[C * D :] if bias else None
        return torch.nn.functional.linear(features, W, b), cov

    def _with_preconditioner_name(self, diag: RefitDiagnostics) -> RefitDiagnostics:
        return dataclasses.replace(
            diag, preconditioner=self._precond_name, choice=self._choice_reason()
        )

    # --------------------------------------------------------- preconditioner
    def _rank(self, n_params: int) -> int:
        """``precondition_rank``, or the automatic rank decided once per fit
        (on CUDA it reads the free memory, which the sketch itself then takes:
        read again, it would shrink and rebuild the sketch on every solve)."""
        rank = self.precondition_rank
        if rank is None:
            if getattr(self, "_auto_rank", None) is None:
                like = torch.empty(0, device=self._device, dtype=self.compute_dtype)
                self._auto_rank = default_rank(n_params, like)
            rank = self._auto_rank
        return min(rank, n_params)

    def _precond_names(self, n_params: int) -> list[str]:
        """Candidate preconditioners, in probe order (the sketch first: it
        usually needs the fewest iterations, which caps the others' probes)."""
        rank = self._rank(n_params)
        choice = self.preconditioner
        if choice == "auto" and self.precondition_rank is None and self._classic():
            module, layout, _ = self._refit_module()
            kfac = ["kfac"] if kfac_supported(module, layout) else []
            return (["nystrom"] if rank > 0 else []) + kfac + ["none"]
        if choice in ("auto", "nystrom"):
            return ["nystrom"] if rank > 0 else ["none"]
        return [choice]

    def _precond_candidates(
        self, obj: LaplaceObjective
    ) -> dict[str, Callable[[], Callable[[Tensor], Tensor] | None]]:
        names = self._precond_names(obj.theta_map.numel())
        return {n: (lambda n=n: self._build_precond(obj, n)) for n in names}

    def _precond_choice(self, obj: LaplaceObjective) -> tuple[str, int]:
        """``("kfac" | "nystrom" | "none", nystrom_rank)`` for this refit."""
        P = obj.theta_map.numel()
        names = self._precond_names(P)
        choice = self._auto(obj) if len(names) > 1 else None
        name = choice.preconditioner if choice is not None else names[0]
        return name, (self._rank(P) if name == "nystrom" else 0)

    def _build_precond(
        self, obj: LaplaceObjective, name: str
    ) -> Callable[[Tensor], Tensor] | None:
        """Preconditioner ``name`` for the current hyperparameters; its data
        part (KFAC factors or Nyström sketch) is built once per fit."""
        if name == "kfac":
            if self._kfac is None:
                # KFAC deep-copies the refit module, whose hooks may hold a
                # tensor of a finished torch.func transform (the last-layer
                # extractor's features after a probe's products)
                self._release_transients()
                module, layout, _ = self._refit_module()
                self._kfac = kfac_factors(obj, module, layout)
            return kfac_apply(self._kfac, obj.h_factor, obj.prior_precision)
        if name == "nystrom":
            rank = self._rank(obj.theta_map.numel())
            # keyed by the rank asked for: the sketch may keep fewer columns
            # (directions a rank-deficient GGN does not resolve)
            if self._sketch is None or self._sketch_rank != rank:
                self._sketch = nystrom_sketch(
                    obj, rank, chunk_size=sketch_columns(self.chunk_size)
                )
                self._sketch_rank = rank
            return nystrom_apply(self._sketch, obj.h_factor, obj.prior_precision)
        return None

    def _precond(self, obj: LaplaceObjective) -> Callable[[Tensor], Tensor] | None:
        """The preconditioner of the CG refits for the current hyperparameters.

        Its data part (KFAC factors or Nyström sketch) is built once per fit
        (it does not depend on the prior, ``sigma_noise`` or the temperature).
        """
        name, _ = self._precond_choice(obj)
        self._precond_name = name
        return self._build_precond(obj, name)
