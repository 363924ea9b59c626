"""Which solver and which preconditioner a refit uses, and their caches.

:class:`SolverMixin` is part of the HFL shell (:class:`laplace_hfl.base.HFLMixin`):

* ``solver="auto"`` solves densely (:mod:`laplace_hfl.dense`: one Cholesky
  factor per prior, reused by every query, grid-search step and prediction)
  when the refit's curvature and its factor fit :data:`~laplace_hfl.dense.DENSE_BUDGET`
  (``P <= 4096``), and by iterative refits (conjugate gradients) above. Amortised
  and minibatch modes keep their own paths.
* ``preconditioner="auto"`` preconditions the CG refits by KFAC
  (:mod:`laplace_hfl.kfac`) where KFAC covers every refit parameter (``Linear``
  and ``Conv2d`` layers) and the data can determine them all (``N C >= P``,
  :meth:`SolverMixin._kfac_helps`), else by the Nyström sketch
  (:mod:`laplace_hfl.preconditioner`, rank ``precondition_rank`` or its default,
  off when the sketch would not fit its budget). Setting ``precondition_rank``
  with ``preconditioner="auto"`` selects the Nyström sketch (``0``: none), as
  before this option existed.

The data curvature (dense ``G``, KFAC factors, Nyström sketch) is computed once
per fit; only its combination with the prior precision, ``sigma_noise`` and the
temperature is redone when those change. The choice made is recorded in
``la.last_diagnostics.solver`` / ``.preconditioner``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from laplace_hfl.dense import (
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
from laplace_hfl.functional import LaplaceObjective
from laplace_hfl.kfac import kfac_apply, kfac_factors, kfac_supported
from laplace_hfl.preconditioner import default_rank, nystrom_apply, nystrom_sketch
from laplace_hfl.refit import RefitDiagnostics

__all__ = ["SolverMixin"]


class SolverMixin:
    """Solver and preconditioner choice with per-fit caches (see module doc)."""

    def _reset_solver_caches(self) -> None:
        self._sketch = None
        self._kfac = None
        self._dense_curv = None
        self._dense_curv_key: tuple | None = None
        self._dense_factor = None
        self._dense_key: tuple | None = None
        self._dense_linear = None

    # ----------------------------------------------------------------- solver
    def _uses_dense(self, n_params: int) -> bool:
        if self.amortize is not None or self.minibatch_epochs is not None:
            return False
        if self.solver == "dense":
            return True
        return self.solver == "auto" and dense_fits(n_params)

    def _query_step(self, obj: LaplaceObjective, n_outputs: int) -> int:
        """Query points per prediction chunk: ``chunk_size`` directions for the
        refits; for the dense solver as many as its memory budget allows."""
        if self._uses_dense(obj.theta_map.numel()):
            return query_rows(obj.theta_map.numel(), max(n_outputs, 1))
        return max(1, self.chunk_size // max(n_outputs, 1))

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
                if self._dense_curv is None:
                    self._dense_curv = data_ggn(obj)
                curv = self._dense_curv
            else:  # the exact Hessian at the refit's base point (depends on prior)
                theta = self._base_point(obj).theta
                curv = data_hessian(obj, theta, self.chunk_size)
            self._dense_factor = factorize(
                curv, obj.h_factor, obj.prior_precision, target
            )
            self._dense_key = key
            self._dense_linear = None
            if target == "ggn":  # records how stationary the MAP is
                self._base = dense_base_point(obj, self._dense_factor)
                self._base_key = key
        return self._dense_factor

    def _dense_diagnostics(self, factor: DenseFactor, m: int, like: Tensor) -> None:
        residual = like.new_full((2, m), factor.residual)
        self.last_diagnostics = RefitDiagnostics(
            eps=like.new_zeros(m),
            residual=residual,
            iterations=torch.zeros(2, m, dtype=torch.long, device=like.device),
            converged=residual <= self.hfl_settings.rtol,
            solver="dense",
            preconditioner="none",
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
        from its inputs (:func:`~laplace_hfl.dense.linear_layer_covariance`).

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
        return dataclasses.replace(diag, preconditioner=self._precond_name)

    # --------------------------------------------------------- preconditioner
    def _precond_choice(self, obj: LaplaceObjective) -> tuple[str, int]:
        """``("kfac" | "nystrom" | "none", nystrom_rank)`` for this refit."""
        P = obj.theta_map.numel()
        rank = (
            default_rank(P, obj.theta_map)
            if self.precondition_rank is None
            else self.precondition_rank
        )
        rank = min(rank, P)
        choice = self.preconditioner
        if choice == "auto":
            # amortised and minibatch modes keep their Nystrom preconditioner
            classic = self.amortize is not None or self.minibatch_epochs is not None
            if self.precondition_rank is None and not classic and self._kfac_helps(P):
                return "kfac", 0
            choice = "nystrom"
        if choice == "nystrom":
            return ("nystrom", rank) if rank > 0 else ("none", 0)
        return choice, 0

    def _kfac_helps(self, n_params: int) -> bool:
        """KFAC covers the refit parameters and the data GGN can have full rank
        (``N C >= P``).

        Below that the GGN is zero on ``P - N C`` directions, where ``A`` is
        exactly the prior (one eigenvalue cluster that plain CG resolves in one
        step) while KFAC's Kronecker factors are full rank: the preconditioned
        operator gets a spread of tiny eigenvalues there. Measured on LeNet
        (44,426 weights, 1,000 MNIST digits, N C = 10,000, prior 1, float32):
        CG to rtol 1e-4 took ~450 iterations plain, > 1,000 with KFAC, ~25
        with the rank-256 Nyström sketch (``benchmarks/results/solvers.json``).
        """
        n_outputs = max(int(getattr(self, "n_outputs", 1) or 1), 1)
        if int(self.n_data) * n_outputs < n_params:
            return False
        module, layout, _ = self._refit_module()
        return kfac_supported(module, layout)

    def _precond(self, obj: LaplaceObjective) -> Callable[[Tensor], Tensor] | None:
        """The preconditioner of the CG refits for the current hyperparameters.

        Its data part (KFAC factors or Nyström sketch) is built once per fit
        (it does not depend on the prior, ``sigma_noise`` or the temperature).
        """
        name, rank = self._precond_choice(obj)
        self._precond_name = name
        if name == "kfac":
            if self._kfac is None:
                module, layout, _ = self._refit_module()
                self._kfac = kfac_factors(obj, module, layout)
            return kfac_apply(self._kfac, obj.h_factor, obj.prior_precision)
        if name == "nystrom":
            if self._sketch is None or self._sketch.U.shape[1] != rank:
                self._sketch = nystrom_sketch(obj, rank, chunk_size=self.chunk_size)
            return nystrom_apply(self._sketch, obj.h_factor, obj.prior_precision)
        return None
