"""The stateful shell shared by the HFL laplace-torch classes.

:class:`HFLMixin` adapts laplace-torch's ``ParametricLaplace`` interface to the
pure estimator in :mod:`laplace_hfl.refit`. Concrete classes say *what* is refit
(the whole network, or the last layer on cached features) through three hooks:
``_fit_pass``, ``_refit_module`` and ``_query_inputs``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_hfl.amortized import (
    AmortizedState,
    amortized_covariance,
    amortized_solve,
    posterior_samples,
)
from laplace_hfl.batches import (
    batch_size,
    check_targets,
    eval_mode,
    merge_batches,
    slice_batch,
    split_batch,
)
from laplace_hfl.errors import HFLNotFittedError
from laplace_hfl.functional import (
    LaplaceObjective,
    ParamLayout,
    batch_loss,
    make_forward,
    output_jacobians,
    to_compute,
)
from laplace_hfl.preconditioner import (
    NystromSketch,
    default_rank,
    nystrom_apply,
    nystrom_sketch,
)
from laplace_hfl.predictive import joint_covariance, marginal_covariance
from laplace_hfl.refit import (
    BasePoint,
    RefitDiagnostics,
    RefitSettings,
    perturbed_refits,
    unperturbed_refit,
)
from laplace_hfl.stochastic import minibatch_refits

__all__ = ["HFLMixin"]

_NO_MARGLIK = (
    "HFL never forms the posterior precision, so it has no log-determinant and "
    "no Laplace marginal likelihood. Tune the prior precision by grid search "
    "on validation data instead: la.optimize_prior_precision(method='gridsearch', "
    "val_loader=val_loader)."
)
_NO_WEIGHT_SPACE = (
    "HFL gives the linearised (GLM) predictive without a weight-space posterior. "
    "Use la(x, pred_type='glm'), la.functional_samples(x) or "
    "la.predictive_samples(x) (both pred_type='glm')."
)


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


class HFLMixin:
    """Hessian-free Laplace behaviour on top of laplace-torch's classes.

    Not used on its own: see :class:`laplace_hfl.HessianFreeLaplace` and
    :class:`laplace_hfl.HessianFreeLLLaplace`.
    """

    #: Whether ``state_dict`` carries the cached refit batches (last-layer
    #: features: small, and they make a loaded estimator predict right away).
    _state_holds_data = False

    # ------------------------------------------------------------------ options
    def _set_hfl_options(self, options: HFLOptions) -> None:
        self.hfl_settings = options.settings
        self.chunk_size = options.chunk_size
        self.compute_dtype = options.compute_dtype
        self.progress_bar = options.progress_bar
        self.amortize = options.amortize
        self.precondition_rank = options.precondition_rank
        self.minibatch_epochs = options.minibatch_epochs
        self._amortized: AmortizedState | None = None
        self._amortized_key: tuple | None = None
        self._fitted = False
        self._training_data: list[tuple[Any, Tensor]] | None = None
        self._train_loader: DataLoader | None = None
        self._base: BasePoint | None = None
        self._base_key: tuple | None = None
        self._sketch: NystromSketch | None = None
        self.last_diagnostics: RefitDiagnostics | None = None

    @staticmethod
    def _validate_hfl_options(
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
    ) -> HFLOptions:
        if likelihood not in ("regression", "classification"):
            raise ValueError(
                f"HFL supports likelihood='regression' or 'classification', not "
                f"{likelihood!r}."
            )
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
            if target != "ggn" or amortize is not None:
                raise ValueError(
                    "minibatch_epochs (minibatch refits) is available for "
                    "target='ggn' without amortize: the network refit "
                    "(target='hessian') needs full-batch Newton steps."
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
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(
                f"chunk_size must be a positive integer, got {chunk_size}."
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
        )

    # ------------------------------------------------------- hooks for classes
    def _fit_pass(
        self, train_loader: DataLoader
    ) -> tuple[Tensor, float, list[tuple[Any, Tensor]] | None, Tensor]:
        """One checked pass over the data.

        Returns the MAP outputs of the first batch, the summed loss, the cached
        refit batches (``None`` to re-iterate the loader) and the MAP vector.
        """
        raise NotImplementedError

    def _refit_module(self) -> tuple[nn.Module, ParamLayout, dict[str, Tensor]]:
        """The module refit, the layout of its refit parameters and the rest."""
        raise NotImplementedError

    def _query_inputs(self, X: Any) -> Any:
        """Inputs of the refit module for raw query inputs ``X``, in the
        compute dtype on the model's device."""
        raise NotImplementedError

    def _training_batches(self) -> Iterator[tuple[Any, Tensor]]:
        if self._training_data is not None:
            yield from self._training_data
            return
        if self._train_loader is None:
            raise HFLNotFittedError(
                "HFL needs the training data to refit, and this estimator has "
                "none (loaded from a state_dict, which never stores a DataLoader). "
                "Call la.fit(train_loader) first."
            )
        device, dtype = self._device, self.compute_dtype
        for data in self._train_loader:
            X, y = split_batch(data, self.dict_key_y)
            yield to_compute(X, device, dtype), to_compute(y, device, dtype)

    # --------------------------------------------------------------------- fit
    def _init_H(self) -> None:
        self.H = None

    def _check_H_init(self) -> None:
        if not getattr(self, "_fitted", False):
            raise HFLNotFittedError(
                "This HFL Laplace is not fitted: call la.fit(train_loader) first."
            )

    def _iterate_checked(
        self, train_loader: DataLoader, module: nn.Module, cache: str | None
    ) -> tuple[Tensor, float, list[tuple[Any, Tensor]] | None]:
        """One pass over the data: checks shapes, loss finiteness, emptiness.

        ``cache="features"`` caches the penultimate features, ``"inputs"`` the
        inputs (both in the compute dtype, as the refit batches); ``None``
        caches nothing (the loader is iterated again on every refit pass).
        """
        device, dtype = self._device, self.compute_dtype
        first_out, loss, n_seen = None, 0.0, 0
        cached: list[tuple[Any, Tensor]] | None = [] if cache else None
        with torch.no_grad():
            for data in train_loader:
                X, y = split_batch(data, self.dict_key_y)
                X = to_compute(X, device, self._dtype)
                y = to_compute(y, device, self._dtype)
                if cache == "features":
                    out, phi = module.forward_with_features(X)
                else:
                    out = module(X)
                if out.ndim != 2:
                    raise ValueError(
                        f"HFL needs model outputs of shape (batch, outputs); got "
                        f"{tuple(out.shape)}."
                    )
                check_targets(self.likelihood, out, y)
                batch = batch_loss(
                    self.likelihood,
                    out.to(dtype),
                    y.to(dtype) if torch.is_floating_point(y) else y,
                )
                if not torch.isfinite(batch):
                    raise ValueError(
                        f"The training loss at the MAP is not finite ({float(batch)}) "
                        f"in batch {n_seen}. HFL needs a finite Laplace objective: "
                        "check the model's outputs and the targets for NaN/inf."
                    )
                loss += float(batch)
                n_seen += 1
                if first_out is None:
                    first_out = out
                if cached is not None:
                    inputs = phi if cache == "features" else X
                    cached.append(
                        (
                            to_compute(inputs, device, dtype),
                            to_compute(y, device, dtype),
                        )
                    )
        if n_seen == 0:
            raise ValueError(
                "train_loader yielded no batches; HFL needs the training data "
                "the MAP was fitted on."
            )
        return first_out, loss, merge_batches(cached, self.refit_batch_size)

    def fit(
        self,
        train_loader: DataLoader,
        override: bool = True,
        progress_bar: bool = False,
        *,
        cache_data: bool = True,
        refit_batch_size: int = 1024,
    ) -> None:
        """Record the MAP and the training data the refits run over.

        No curvature is computed here: HFL's work happens at prediction time
        (and is cached per prior precision and noise).

        Parameters
        ----------
        train_loader : torch.utils.data.DataLoader
            Batches ``(X, y)`` or dict batches with ``dict_key_y``; must be the
            data the MAP was trained on. ``train_loader.dataset`` gives ``N``.
            It is iterated again at prediction time (all-weights HFL), so it
            must be deterministic (no random augmentation).
        override : bool, default=True
            Must be True: HFL refits on one training set.
        progress_bar : bool, default=False
            Show tqdm progress bars during refits.
        cache_data : bool, default=True
            Keep the training inputs in memory (compute dtype) for the refits,
            which pass over the data many times. Set False for data that does
            not fit in memory: the loader is then iterated on every pass and
            must be deterministic. Last-layer HFL always caches features.
        refit_batch_size : int, default=1024
            Cached tensor batches are merged into batches of up to this many
            rows (fewer, larger vectorised passes).

        Raises
        ------
        ValueError
            Empty loader, target shape mismatch, non-finite loss at the MAP,
            ``override=False``.
        """
        if not override:
            raise ValueError(
                "HFL does not accumulate curvature across calls (override=False); "
                "pass all training data in one DataLoader."
            )
        if not (isinstance(refit_batch_size, int) and refit_batch_size >= 1):
            raise ValueError(
                f"refit_batch_size must be a positive integer, got {refit_batch_size!r}."
            )
        self.refit_batch_size = refit_batch_size
        self.cache_data = cache_data
        first_out, loss, cached, mean = self._fit_pass(train_loader)
        # Commit state only after every check passed.
        self.loss = loss
        self.n_outputs = int(first_out.shape[-1])
        self.n_data = len(train_loader.dataset)
        self.mean = mean
        self._training_data = cached
        self._train_loader = train_loader if cached is None else None
        self._base = None
        self._base_key = None
        self._sketch = None
        self._amortized = None
        self._amortized_key = None
        self._fitted = True
        self.progress_bar = self.progress_bar or progress_bar
        if self.amortize is not None:
            with eval_mode(self.model):
                self._amortized_state(self._objective())

    # ---------------------------------------------------------------- refits
    def _objective(self) -> LaplaceObjective:
        module, layout, fixed = self._refit_module()
        dtype = self.compute_dtype
        return LaplaceObjective(
            forward=make_forward(module, layout, fixed),
            batches=self._training_batches,
            likelihood=self.likelihood,
            h_factor=float(self._H_factor),
            prior_precision=self.prior_precision_diag.to(dtype),
            prior_mean=self.prior_mean.to(dtype),
            theta_map=self.mean.detach().to(dtype),
        )

    def _hyper_key(self) -> tuple:
        return (
            tuple(self.prior_precision.detach().cpu().flatten().tolist()),
            tuple(self.prior_mean.detach().cpu().flatten().tolist()),
            float(self.sigma_noise),
            float(self.temperature),
            self.hfl_settings,
        )

    def _base_point(self, obj: LaplaceObjective) -> BasePoint:
        key = self._hyper_key()
        if self._base is None or self._base_key != key:
            self._base = unperturbed_refit(obj, self.hfl_settings, self._precond(obj))
            self._base_key = key
        return self._base

    def _amortized_state(self, obj: LaplaceObjective) -> AmortizedState:
        """Posterior samples for the current hyperparameters (built once)."""
        key = self._hyper_key() + (int(self.amortize),)
        if self._amortized is None or self._amortized_key != key:
            if self._training_data is None and self._train_loader is None:
                raise HFLNotFittedError(
                    "The stored amortised samples belong to other hyperparameters "
                    "(prior precision, sigma_noise, temperature or settings changed "
                    "since they were drawn) and this estimator has no training data "
                    "to redraw them: call la.fit(train_loader) again."
                )
            self._amortized = posterior_samples(
                obj,
                int(self.amortize),
                rtol=self.hfl_settings.rtol,
                max_iter=self.hfl_settings.max_iter,
                precond=self._precond(obj),
            )
            self._amortized_key = key
        return self._amortized

    def _solve(self, obj: LaplaceObjective, V: Tensor) -> Tensor:
        """``P^{-1} v`` estimates for the rows of ``V`` by perturbed refits."""
        if self.minibatch_epochs is not None:
            res = minibatch_refits(
                obj,
                V,
                self.n_data,
                epochs=self.minibatch_epochs,
                precond=self._precond(obj),
            )
            self.last_diagnostics = res
            return res.U
        if self.amortize is not None:
            return amortized_solve(self._amortized_state(obj).samples, V)
        U, self.last_diagnostics = perturbed_refits(
            obj,
            self._base_point(obj),
            V,
            self.hfl_settings,
            chunk_size=self.chunk_size,
            progress_bar=self.progress_bar,
            precond=self._precond(obj),
        )
        return U

    def _precond(self, obj: LaplaceObjective) -> Callable[[Tensor], Tensor] | None:
        """Nyström preconditioner for the current hyperparameters.

        The sketch of the data GGN is built once per fit (it does not depend on
        the prior, ``sigma_noise`` or the temperature).
        """
        P = obj.theta_map.numel()
        rank = (
            default_rank(P)
            if self.precondition_rank is None
            else self.precondition_rank
        )
        rank = min(rank, P)
        if rank == 0:
            return None
        if self._sketch is None or self._sketch.U.shape[1] != rank:
            self._sketch = nystrom_sketch(obj, rank, chunk_size=self.chunk_size)
        return nystrom_apply(self._sketch, obj.h_factor, obj.prior_precision)

    @property
    def map_gradient_norm(self) -> float:
        """``||grad L(theta_MAP)||``: how stationary the MAP is.

        Computed by the first exact prediction; ``nan`` before that (and in
        amortised mode, which never needs it).
        """
        return float("nan") if self._base is None else self._base.map_grad_norm

    # ------------------------------------------------------------ predictive
    def _check_ready(self, x: Any) -> None:
        self._check_H_init()
        if batch_size(x, self.dict_key_x) == 0:
            raise ValueError("HFL predictions need at least one input.")

    def _glm_predictive_distribution(
        self,
        X: Tensor | MutableMapping[str, Any],
        joint: bool = False,
        diagonal_output: bool = False,
    ) -> tuple[Tensor, Tensor]:
        self._check_ready(X)
        backprop = self.enable_backprop
        with eval_mode(self.model), torch.set_grad_enabled(backprop):
            Xq = self._query_inputs(X)
        if self.amortize is not None:
            with eval_mode(self.model):
                obj = self._objective()
                samples = self._amortized_state(obj).samples
                f_mu, f_var = amortized_covariance(
                    obj.forward, obj.theta_map, Xq, samples, joint=joint
                )
            if joint:
                f_mu = f_mu.flatten()
            elif diagonal_output:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
            return f_mu.to(self._dtype), f_var.to(self._dtype)
        with eval_mode(self.model):
            obj = self._objective()
            theta = obj.theta_map
            B = batch_size(Xq, self.dict_key_x)
            C = self.n_outputs
            step = max(1, self.chunk_size // max(C, 1)) if not joint else B
            mus, covs, Js_all, U_all = [], [], [], []
            for start in range(0, B, step):
                Xc = slice_batch(Xq, start, start + step)
                with torch.set_grad_enabled(backprop):
                    Js, f = output_jacobians(obj.forward, theta, Xc)
                if not backprop:
                    Js, f = Js.detach(), f.detach()
                U = self._solve(obj, Js.detach().reshape(-1, Js.shape[-1]))
                mus.append(f)
                if joint:
                    Js_all.append(Js)
                    U_all.append(U)
                else:
                    covs.append(marginal_covariance(Js, U))
        f_mu = torch.cat(mus)
        if joint:
            f_var = joint_covariance(torch.cat(Js_all), torch.cat(U_all))
            f_mu = f_mu.flatten()
        else:
            f_var = torch.cat(covs)
            if diagonal_output:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        out_dtype = self._dtype
        return f_mu.to(out_dtype), f_var.to(out_dtype)

    def _solve_jacobians(self, Js: Tensor) -> tuple[Tensor, Tensor]:
        self._check_H_init()
        self._check_jacobians(Js)
        Jc = Js.detach().to(self.compute_dtype)
        with eval_mode(self.model):
            U = self._solve(self._objective(), Jc.reshape(-1, Jc.shape[-1]))
        return Jc, U

    def functional_variance(self, Js: Tensor) -> Tensor:
        """``J P^{-1} J^T`` per input from given Jacobians, by refits.

        Parameters
        ----------
        Js : Tensor
            Jacobians ``(batch, outputs, parameters)``.

        Returns
        -------
        Tensor
            ``(batch, outputs, outputs)``, symmetric PSD.
        """
        Jc, U = self._solve_jacobians(Js)
        return marginal_covariance(Jc, U).to(Js.dtype)

    def functional_covariance(self, Js: Tensor) -> Tensor:
        """Joint ``J P^{-1} J^T`` over all inputs and outputs, input-major.

        Parameters
        ----------
        Js : Tensor
            Jacobians ``(batch, outputs, parameters)``.

        Returns
        -------
        Tensor
            ``(batch*outputs, batch*outputs)``, symmetric PSD.
        """
        Jc, U = self._solve_jacobians(Js)
        return joint_covariance(Jc, U).to(Js.dtype)

    def __call__(
        self,
        x: Tensor | MutableMapping[str, Any],
        pred_type: str = "glm",
        joint: bool = False,
        link_approx: str = "probit",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
        fitting: bool = False,
        **model_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Linearised (GLM) predictive; see laplace-torch's ``__call__``.

        Raises
        ------
        NotImplementedError
            For ``pred_type`` other than ``"glm"``.
        """
        self._require_glm(pred_type)
        return super().__call__(
            x,
            pred_type=pred_type,
            joint=joint,
            link_approx=link_approx,
            n_samples=n_samples,
            diagonal_output=diagonal_output,
            generator=generator,
            fitting=fitting,
            **model_kwargs,
        )

    @staticmethod
    def _require_glm(pred_type: str) -> None:
        if pred_type != "glm":
            raise NotImplementedError(
                f"pred_type={pred_type!r} is not available with HFL: "
                + _NO_WEIGHT_SPACE
            )

    def functional_samples(
        self,
        x: Tensor | MutableMapping[str, Any],
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the linearised function-space posterior (``pred_type='glm'``)."""
        self._require_glm(pred_type)
        return super().functional_samples(
            x, pred_type, n_samples, diagonal_output, generator
        )

    def predictive_samples(
        self,
        x: Tensor | MutableMapping[str, Any],
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Samples of the GLM predictive (softmax applied for classification)."""
        self._require_glm(pred_type)
        return super().predictive_samples(
            x, pred_type, n_samples, diagonal_output, generator
        )

    # ------------------------------------------------------------- tuning
    def optimize_prior_precision(
        self, pred_type: str = "glm", method: str = "gridsearch", **kwargs: Any
    ) -> None:
        """Tune the prior precision by grid search on validation data.

        Parameters
        ----------
        pred_type : {"glm"}
        method : {"gridsearch"}
            ``"marglik"`` is refused (no log-determinant in HFL).
        **kwargs
            Passed to laplace-torch's grid search (``val_loader`` is required;
            ``grid_size``, ``log_prior_prec_min/max``, ``link_approx``, ...).

        Raises
        ------
        NotImplementedError
            ``method="marglik"``.
        ValueError
            ``val_loader`` missing.
        """
        if method != "gridsearch":
            raise NotImplementedError(
                f"method={method!r} is not available: " + _NO_MARGLIK
            )
        self._require_glm(pred_type)
        if kwargs.get("val_loader") is None:
            raise ValueError(
                "Grid search needs validation data: pass val_loader=DataLoader(...)."
            )
        with eval_mode(self.model):
            super().optimize_prior_precision(
                pred_type=pred_type, method=method, **kwargs
            )

    # -------------------------------------------------------------- refusals
    def log_marginal_likelihood(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available: raises ``NotImplementedError`` naming grid search."""
        raise NotImplementedError(_NO_MARGLIK)

    @property
    def posterior_precision(self) -> Tensor:
        """Not available: HFL never forms the posterior precision."""
        raise NotImplementedError(
            "HFL never forms the posterior precision (that is the point); "
            "predictive covariances come from la(x) or la.functional_variance(Js)."
        )

    @property
    def log_det_posterior_precision(self) -> Tensor:
        raise NotImplementedError(_NO_MARGLIK)

    def square_norm(self, value: Tensor) -> Tensor:
        raise NotImplementedError(_NO_WEIGHT_SPACE)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Not available: no weight-space density in HFL."""
        raise NotImplementedError(_NO_WEIGHT_SPACE)

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Not available: no weight-space samples in HFL."""
        raise NotImplementedError(_NO_WEIGHT_SPACE)

    # ----------------------------------------------------------------- state
    def _hfl_state(self) -> dict[str, Any]:
        s = self.hfl_settings
        return {
            "target": s.target,
            "eps": s.eps,
            "rtol": s.rtol,
            "max_iter": s.max_iter,
            "max_newton": s.max_newton,
            "compute_dtype": str(self.compute_dtype),
            "amortize": self.amortize,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the estimator, never a DataLoader.

        All-weights HFL stores no training data: after ``load_state_dict``
        call ``fit(train_loader)`` again before predicting. Last-layer HFL
        stores its cached features and predicts right away.
        """
        self._check_H_init()
        return {
            "mean": self.mean,
            "loss": self.loss,
            "prior_mean": self.prior_mean,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "n_data": self.n_data,
            "n_outputs": self.n_outputs,
            "likelihood": self.likelihood,
            "temperature": self.temperature,
            "enable_backprop": self.enable_backprop,
            "cls_name": self.__class__.__name__,
            "hfl": self._hfl_state(),
            "training_features": self._training_data
            if self._state_holds_data
            else None,
            "amortized": None
            if self._amortized is None
            else {
                "samples": self._amortized.samples,
                "residual": self._amortized.residual,
                "iterations": self._amortized.iterations,
                "key": self._amortized_key,
            },
        }

    def _check_state_class(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("cls_name") != self.__class__.__name__:
            raise ValueError(
                f"State of {state_dict.get('cls_name')!r} cannot be loaded into "
                f"{self.__class__.__name__}; check subset_of_weights and "
                "hessian_structure."
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises
        ------
        ValueError
            Different estimator class, parameter count, likelihood or target.
        """
        self._check_state_class(state_dict)
        if self.n_params is not None and len(state_dict["mean"]) != self.n_params:
            raise ValueError(
                f"State has {len(state_dict['mean'])} parameters, this model "
                f"{self.n_params}; use the same model and requires_grad switches."
            )
        if state_dict["likelihood"] != self.likelihood:
            raise ValueError("State was fitted with a different likelihood.")
        if state_dict["hfl"]["target"] != self.hfl_settings.target:
            raise ValueError(
                f"State was fitted with target={state_dict['hfl']['target']!r}, "
                f"this estimator uses {self.hfl_settings.target!r}."
            )
        self.mean = state_dict["mean"]
        self.loss = state_dict["loss"]
        self.prior_mean = state_dict["prior_mean"]
        self.prior_precision = state_dict["prior_precision"]
        self.sigma_noise = state_dict["sigma_noise"]
        self.n_data = state_dict["n_data"]
        self.n_outputs = state_dict["n_outputs"]
        self.temperature = state_dict["temperature"]
        self._training_data = state_dict.get("training_features")
        self._train_loader = None
        self._base = None
        self._base_key = None
        self._sketch = None
        amortized = state_dict.get("amortized")
        if amortized is not None and self.amortize is not None:
            self._amortized = AmortizedState(
                amortized["samples"], amortized["residual"], amortized["iterations"]
            )
            self._amortized_key = tuple(amortized["key"])
        else:
            self._amortized = None
            self._amortized_key = None
        self._fitted = True
