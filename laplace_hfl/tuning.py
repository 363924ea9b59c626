"""Prior-precision tuning and the marginal likelihood of the HFL shell.

The math lives in :mod:`laplace_hfl.engine.logdet` (log-determinant by stochastic
Lanczos quadrature over curvature-vector products) and
:mod:`laplace_hfl.engine.mackay` (fixed-point prior update); this mixin wires them to
laplace-torch's ``log_det_posterior_precision``, ``log_marginal_likelihood``
and ``optimize_prior_precision``. ``log_likelihood``, ``scatter``,
``log_det_prior_precision`` and ``log_det_ratio`` are laplace-torch's own.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from laplace.utils import fix_prior_prec_structure
from laplace.utils.utils import validate
from torch import Tensor
from torch.linalg import LinAlgError

from laplace_hfl.engine.batches import eval_mode
from laplace_hfl.engine.functional import LaplaceObjective
from laplace_hfl.engine.gridsearch import check_loss, run_gridsearch
from laplace_hfl.engine.logdet import (
    LogDetEstimate,
    MarglikSettings,
    curvature_quadrature,
    dense_logdet,
    diag_inverse,
    eigen_logdet,
    isotropic_logdet,
    isotropic_trace_inverse,
    posterior_logdet,
)
from laplace_hfl.engine.mackay import FixedPointResult, mackay_fixed_point
from laplace_hfl.engine.preconditioner import CPU_SKETCH_BUDGET
from laplace_hfl.engine.sketch_logdet import (
    CurvatureSketch,
    SketchLogDet,
    curvature_sketch,
    eigen_sketch,
    sketch_logdet,
)
from laplace_hfl.engine.slq import Quadrature
from laplace_hfl.engine.validation import as_int
from laplace_hfl.engine.weight_posterior import curvature_matvec
from laplace_hfl.errors import RefitConvergenceWarning, warn_user

__all__ = ["TuningMixin"]


def _check_positive(name: str, value: Any) -> None:
    try:
        t = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"{name} must be a number or a tensor, got {value!r}."
        ) from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not bool((t > 0).all()):
        raise ValueError(
            f"{name} must be finite and positive, got {value!r}. Optimise its "
            "logarithm (exp(log_value)) to keep it positive."
        )


class TuningMixin:
    """``optimize_prior_precision``, ``log_marginal_likelihood``, ``log_det_*``.

    Attributes
    ----------
    marglik_settings : MarglikSettings
        Probes, Lanczos steps and CG tolerance of the log-determinant
        (``la.marglik_settings = MarglikSettings(n_probes=128)``).
    last_logdet : LogDetEstimate or None
        Value, standard error and exactness of the last log-determinant.
    last_fixed_point : FixedPointResult or None
        Result of the last ``optimize_prior_precision(..., fixed_point=True)``.
    """

    marglik_settings: MarglikSettings = MarglikSettings()
    last_logdet: LogDetEstimate | None = None
    last_fixed_point: FixedPointResult | None = None

    # ------------------------------------------------------------ internals
    def _marglik_objective(self) -> LaplaceObjective:
        with eval_mode(self.model):
            obj = self._objective()
        return dataclasses.replace(obj, prior_precision=obj.prior_precision.detach())

    def _curvature_rules(self, obj: LaplaceObjective) -> Quadrature:
        """Lanczos rules of the data curvature, built once per fit."""
        key = (id(self.mean), self.hfl_settings.target, self.marglik_settings)
        cached = self.__dict__.get("_marglik_rules")
        if cached is None or cached[0] != key or cached[1] is not self.mean:
            with eval_mode(self.model):
                rules = curvature_quadrature(
                    obj, self.hfl_settings.target, self.marglik_settings
                )
            self._marglik_rules = (key, self.mean, rules)
            return rules
        return cached[2]

    # ---------------------------------------- sketched curvature, any prior
    def _sketch_rank(self, obj: LaplaceObjective) -> int:
        """Rank of the curvature sketch for a layer-wise / diagonal prior; 0
        where Lanczos on the posterior precision runs instead (exact mode,
        ``target="hessian"``, ``sketch_rank=0``)."""
        settings, P = self.marglik_settings, obj.theta_map.numel()
        if not self.hfl_settings.curvature.gauss_newton or P <= settings.exact_max:
            return 0
        return min(settings.sketch_rank, P, CPU_SKETCH_BUDGET // P)

    def _curvature_sketch(self, obj: LaplaceObjective, rank: int) -> CurvatureSketch:
        """Nyström sketch of the data GGN, built once per fit (it does not
        depend on the prior, ``sigma_noise`` or the temperature)."""
        settings, target = self.marglik_settings, self.hfl_settings.target
        key = (target, settings, rank)  # and the fit: the MAP tensor itself
        cached = self.__dict__.get("_marglik_sketch")
        if cached is None or cached[0] != key or cached[1] is not self.mean:
            with eval_mode(self.model):
                sketch = curvature_sketch(
                    lambda V: curvature_matvec(obj, target, V),
                    obj.theta_map,
                    rank,
                    settings.n_probes,
                    settings.seed,
                    self._precond_setup(obj.theta_map.numel()).chunk_size,
                )
            cached = self._marglik_sketch = (key, self.mean, sketch, [False])
        return cached[2]

    def _sketched_value(
        self, sketch: CurvatureSketch, h: Tensor
    ) -> tuple[Tensor, SketchLogDet]:
        """``sketch_logdet`` at the current prior: per layer where the prior is
        layer-wise (Gram matrices per layer), else its diagonal."""
        prior, numels = self.prior_precision.reshape(-1), None
        layers = self._refit_module()[1].numels
        P = sketch.U.shape[0]
        if prior.numel() == len(layers) != P and sum(layers) == P:
            numels = layers
        else:
            prior = self.prior_precision_diag
        return sketch_logdet(sketch, h, prior, numels)

    def _sketch_log_det(
        self, obj: LaplaceObjective, h: Tensor, rank: int
    ) -> Tensor | None:
        """``log det P`` of a layer-wise / diagonal prior from the sketch:
        ``r x r`` work per prior value, no data pass after the first. None
        where the sketch's remainder exceeds ``sketch_tolerance`` (Lanczos on
        the posterior precision then runs for this value)."""
        sketch = self._curvature_sketch(obj, rank)
        value, info = self._sketched_value(sketch, h)
        n_probes = 0 if sketch.Z is None else sketch.Z.shape[0]
        warned = self._marglik_sketch[3]
        if info.truncation > self.marglik_settings.sketch_tolerance:
            if not warned[0]:
                warned[0] = True
                warn_user(
                    f"The rank-{sketch.rank} sketch of the GGN leaves a remainder "
                    f"of up to {info.truncation:.3g} nats in the log-determinant "
                    "of the marginal likelihood (more than la.marglik_settings."
                    "sketch_tolerance), so Lanczos on the posterior precision "
                    "runs at such prior values instead (data passes at every "
                    "value). Raise la.marglik_settings.sketch_rank (the GGN's "
                    "rank is at most the number of training outputs) for the "
                    "fast path.",
                    RefitConvergenceWarning,
                )
            return None
        self.last_logdet = LogDetEstimate(
            float(value.detach()), info.stderr, n_probes, 0, sketch.exact,
            info.truncation, sketch.rank,
        )  # fmt: skip
        return value

    # ------------------------------------------------- exact, dense curvature
    def _dense_marglik(self, obj: LaplaceObjective) -> bool:
        """Whether the log-determinant comes from the dense data GGN: where the
        dense solver is used (``target="ggn"``), unless ``exact_max=0`` asks
        for the stochastic estimator."""
        return (
            not self.hfl_settings.curvature.at_base_point
            and self.marglik_settings.exact_max > 0
            and self._uses_dense(obj.theta_map.numel())
        )

    def _dense_log_det(self, obj: LaplaceObjective, h: Tensor) -> Tensor:
        """Exact ``log det P``: eigenvalues of ``G`` (once per fit) for a
        scalar prior; for a layer-wise or diagonal prior its eigenvectors too
        (:func:`eigen_sketch`, once per fit: ``r x r`` work per value);
        differentiable."""
        G = self._dense_ggn(obj)
        P = G.shape[0]
        scalar = self.prior_precision.numel() == 1
        cached = self.__dict__.get("_marglik_eigs")
        if cached is None or cached[0] is not G or cached[1] != scalar:
            eigs = torch.linalg.eigvalsh(G) if scalar else eigen_sketch(G)
            cached = self._marglik_eigs = (G, scalar, eigs)
        if scalar:
            lam = self.prior_precision.reshape(()).to(G.dtype)
            value = eigen_logdet(cached[2], h.to(G.dtype), lam)
        else:
            value = self._sketched_value(cached[2], h.to(G.dtype))[0]
        self.last_logdet = LogDetEstimate(float(value.detach()), 0.0, P, 0, True)
        return value

    def _check_hyper(self) -> None:
        self._check_H_init()
        _check_positive("prior_precision", self.prior_precision)
        _check_positive("sigma_noise", self.sigma_noise)

    # ----------------------------------------------------- log-determinants
    @property
    def log_det_posterior_precision(self) -> Tensor:
        """``log det P`` of the posterior precision, without forming ``P``.

        Stochastic Lanczos quadrature over curvature-vector products
        (exact for ``P <= marglik_settings.exact_max``); a layer-wise or
        diagonal prior above that uses one Nyström sketch of the GGN per fit
        (``marglik_settings.sketch_rank``); differentiable w.r.t.
        ``prior_precision`` and ``sigma_noise`` / ``temperature``. The standard
        error is in ``la.last_logdet``. See ``docs/marglik.md``.

        Raises
        ------
        HFLNotFittedError
            Not fitted, or no training data (loaded from a state dict).
        ValueError
            Non-positive or non-finite prior precision or ``sigma_noise``.
        IndefiniteHessianError
            ``target="hessian"`` and the posterior precision is not positive
            definite.
        """
        self._check_hyper()
        dtype, settings = self.compute_dtype, self.marglik_settings
        h = self._H_factor.to(dtype)
        obj = self._marglik_objective()
        if self._dense_marglik(obj):
            return self._dense_log_det(obj, h).to(self._dtype)
        if self.prior_precision.numel() == 1:
            rules = self._curvature_rules(obj)
            lam = self.prior_precision.reshape(()).to(dtype)
            value, stderr = isotropic_logdet(rules, h, lam)
            self.last_logdet = LogDetEstimate(
                float(value.detach()),
                stderr,
                rules.nodes.shape[0],
                int(rules.steps.max()),
                rules.exact,
            )
        elif (rank := self._sketch_rank(obj)) and (
            sketched := self._sketch_log_det(obj, h, rank)
        ) is not None:
            value = sketched
        else:
            p0 = self.prior_precision_diag.to(dtype)
            with eval_mode(self.model):
                value, self.last_logdet = posterior_logdet(
                    obj,
                    self.hfl_settings.target,
                    h,
                    p0,
                    settings,
                    precond=self._precond(obj),
                    backward_context=lambda: eval_mode(self.model),
                )
        return value.to(self._dtype)

    def log_marginal_likelihood(
        self,
        prior_precision: Tensor | None = None,
        sigma_noise: Tensor | None = None,
    ) -> Tensor:
        """Laplace log marginal likelihood, as laplace-torch defines it.

        ``log_likelihood - 1/2 (log_det_ratio + scatter)`` with the
        log-determinant of :attr:`log_det_posterior_precision`. Differentiable
        w.r.t. ``prior_precision`` (scalar, layer-wise or diagonal) and
        ``sigma_noise``; passing them overwrites the current values, as in
        laplace-torch.

        Raises
        ------
        HFLNotFittedError
            Not fitted.
        ValueError
            Non-positive or non-finite ``prior_precision`` / ``sigma_noise``,
            ``sigma_noise`` for classification (state unchanged).
        IndefiniteHessianError
            ``target="hessian"`` and the posterior precision is not positive
            definite.
        """
        self._check_H_init()
        if prior_precision is not None:
            _check_positive("prior_precision", prior_precision)
        if sigma_noise is not None:
            if self.likelihood != "regression":
                raise ValueError("Can only change sigma_noise for regression.")
            _check_positive("sigma_noise", sigma_noise)
        return super().log_marginal_likelihood(prior_precision, sigma_noise)

    # ---------------------------------------------------------------- tuning
    def optimize_prior_precision(
        self,
        pred_type: str = "glm",
        method: str = "marglik",
        *,
        fixed_point: bool = False,
        **kwargs: Any,
    ) -> None:
        """Tune the prior precision, as laplace-torch does.

        Parameters
        ----------
        pred_type : {"glm"}
        method : {"marglik", "gridsearch"}, default="marglik"
            ``"marglik"`` runs laplace-torch's own Adam loop on
            :meth:`log_marginal_likelihood` (with a scalar prior every step
            reuses one Lanczos run: no data pass after the first);
            ``"gridsearch"`` needs ``val_loader``.
        fixed_point : bool, default=False
            With ``method="marglik"``: MacKay's fixed point
            ``p_g <- gamma_g / ||theta_g - mu_0||^2`` instead of Adam (same
            optimum, a few iterations; ``n_steps`` bounds them, ``lr`` is
            unused). See ``docs/marglik.md``.
        **kwargs
            laplace-torch's options (``n_steps``, ``lr``, ``init_prior_prec``,
            ``prior_structure``, ``val_loader``, ``grid_size``, ...). For grid
            search in regression pass a loss that scores the variance,
            ``loss=laplace_hfl.engine.gridsearch.gaussian_nll_loss(la.sigma_noise)``:
            laplace-torch's default (MSE of the mean) ignores the prior.

        Raises
        ------
        ValueError
            ``val_loader`` missing for grid search; bad ``init_prior_prec``.
        HFLNotFittedError
            Not fitted.
        IndefiniteHessianError
            ``target="hessian"`` and the posterior precision is not positive
            definite.

        Warns
        -----
        VarianceBlindLossWarning
            Grid search for regression with a loss that ignores the variance.
        GridSearchCostWarning
            The first grid value predicts a long search (estimate given).
        """
        self._check_tuning_options(pred_type, method, kwargs)
        if method == "marglik":
            self._check_H_init()
            if "init_prior_prec" in kwargs:
                _check_positive("init_prior_prec", kwargs["init_prior_prec"])
            if fixed_point:
                self._fixed_point_prior(**kwargs)
                return
            with eval_mode(self.model):
                super().optimize_prior_precision(
                    pred_type=pred_type, method=method, **kwargs
                )
            return
        if fixed_point:
            raise ValueError("fixed_point=True needs method='marglik'.")
        if method == "gridsearch":
            self._require_glm(pred_type)
            if kwargs.get("val_loader") is None:
                raise ValueError(
                    "Grid search needs validation data: pass "
                    "val_loader=DataLoader(...)."
                )
            check_loss(self.likelihood, kwargs.get("loss"))
        with eval_mode(self.model):
            super().optimize_prior_precision(
                pred_type=pred_type, method=method, **kwargs
            )

    def _check_tuning_options(
        self, pred_type: str, method: str, kwargs: dict[str, Any]
    ) -> None:
        """Refuse options that laplace-torch would turn into an arbitrary
        prior (``n_steps=0`` resets it to ``init_prior_prec``), a bare
        AssertionError (``pred_type``, ``method``) or an empty grid."""
        self._require_glm(pred_type)
        if method not in ("marglik", "gridsearch"):
            raise ValueError(
                f"method must be 'marglik' or 'gridsearch', got {method!r}."
            )
        for name, minimum in (("n_steps", 1), ("grid_size", 1)):
            if name in kwargs:
                kwargs[name] = as_int(name, kwargs[name], minimum)
        if "lr" in kwargs:
            _check_positive("lr", kwargs["lr"])

    def _gridsearch(
        self,
        loss: Any,
        interval: Tensor,
        val_loader: Any,
        pred_type: str,
        link_approx: str = "probit",
        n_samples: int = 100,
        progress_bar: bool = False,
    ) -> Tensor:
        """laplace-torch's grid search, timed: warns with the expected total
        when it will take long (see :mod:`laplace_hfl.engine.gridsearch`)."""

        def score() -> float:
            try:
                return validate(
                    self, val_loader, loss, pred_type=pred_type,
                    link_approx=link_approx, n_samples=n_samples,
                    dict_key_y=self.dict_key_y,
                )  # fmt: skip
            except LinAlgError:
                return float("inf")

        return run_gridsearch(
            self, list(interval), score, progress_bar or self.progress_bar
        )

    def _fixed_point_prior(
        self,
        n_steps: int = 100,
        init_prior_prec: float | Tensor = 1.0,
        prior_structure: str = "scalar",
        val_loader: Any = None,
        verbose: bool = False,
        tol: float = 1e-6,
        **unused: Any,
    ) -> None:
        if val_loader is not None:
            warnings.warn(
                "`val_loader` will be ignored when `method` == 'marglik'. "
                "Do you mean to set `method = 'gridsearch'`?",
                stacklevel=3,
            )
        init = torch.as_tensor(init_prior_prec, device=self._device, dtype=self._dtype)
        init = init.reshape(-1)
        if init.numel() == 1 and prior_structure != "scalar":
            init = fix_prior_prec_structure(
                init.item(),
                prior_structure,
                self.n_layers,
                self.n_params,
                self._device,
                self._dtype,
            )
        dtype, target = self.compute_dtype, self.hfl_settings.target
        numels = torch.as_tensor(self._refit_module()[1].numels)
        n_groups = init.numel()
        if n_groups == 1:
            group = torch.zeros(self.n_params, dtype=torch.long)
        elif n_groups == self.n_params:
            group = torch.arange(self.n_params)
        elif n_groups == len(numels):
            group = torch.repeat_interleave(torch.arange(n_groups), numels)
        else:
            raise ValueError(
                "init_prior_prec must be scalar, per layer or per parameter."
            )
        group = group.to(self._device)
        obj = self._marglik_objective()
        h = float(self._H_factor.detach())
        if n_groups == 1:
            rules = self._curvature_rules(obj)

            def group_trace(p: Tensor) -> Tensor:
                return isotropic_trace_inverse(rules, torch.tensor(h), p[0]).reshape(1)

        elif self._dense_marglik(obj):
            G = self._dense_ggn(obj)

            def group_trace(p: Tensor) -> Tensor:
                _, L = dense_logdet(G, torch.tensor(h, dtype=G.dtype), p[group])
                d = torch.cholesky_inverse(L).diagonal()
                return torch.zeros_like(p).index_add_(0, group, d.to(p))

        else:

            def group_trace(p: Tensor) -> Tensor:
                at = dataclasses.replace(obj, prior_precision=p[group])
                with eval_mode(self.model):
                    d = diag_inverse(
                        at, target, self.marglik_settings, self._precond(at)
                    )
                return torch.zeros_like(p).index_add_(0, group, d)

        delta = (self.mean - self.prior_mean).detach().to(dtype)
        result = mackay_fixed_point(
            group_trace, group, delta, init.to(dtype), max_iter=n_steps, tol=tol
        )
        self.last_fixed_point = result
        if not result.converged:
            warnings.warn(
                f"The fixed-point prior update did not converge in {n_steps} "
                "iterations; raise n_steps.",
                stacklevel=3,
            )
        self.prior_precision = result.prior_precision.to(self._dtype)
        if verbose:
            print(f"Optimized prior precision is {self.prior_precision}.")
