"""The stateful shell shared by the HFL laplace-torch classes.

:class:`HFLMixin` adapts laplace-torch's ``ParametricLaplace`` interface to the
pure estimator in :mod:`laplace_hfl.engine.refit`. Concrete classes say *what* is refit
(the whole network, or the last layer on cached features) through three hooks:
``_fit_pass``, ``_refit_module`` and ``_query_inputs``.

This module holds the core (options, fit, the refit objective and its
hyperparameter key); the solver and preconditioner objects in use, with their
caches, are kept by :mod:`laplace_hfl.solver_choice`. The rest of the laplace-torch interface lives beside
it, one mixin a concern: :mod:`laplace_hfl.prediction` (GLM predictive),
:mod:`laplace_hfl.tuning` (prior tuning, marginal likelihood),
:mod:`laplace_hfl.weight_space` (posterior precision, samples, density) and
:mod:`laplace_hfl.state` (``state_dict``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from laplace.lllaplace import LLLaplace
from torch import Tensor, nn
from torch.utils.data import DataLoader

from laplace_hfl.distributed import (
    DistributedMixin,
    data_reducer,
    is_distributed,
)
from laplace_hfl.engine.amortized import AmortizedState
from laplace_hfl.engine.batches import (
    buffers_kept,
    check_output,
    check_targets,
    eval_mode,
    merge_batches,
    split_batch,
)
from laplace_hfl.engine.chunk_memory import CPU_CHUNK, choose_chunk
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    ParamLayout,
    batch_loss,
    make_forward,
    private_modules,
    to_compute,
)
from laplace_hfl.engine.keys import TensorKey
from laplace_hfl.engine.precision import auto_compute_dtype
from laplace_hfl.engine.preconditioner import NystromSketch
from laplace_hfl.engine.refit import RefitDiagnostics
from laplace_hfl.engine.validation import (
    as_bool,
    as_int,
    check_finite_batch,
    check_one_dtype,
    curvature_likelihood,
    dataset_size,
)
from laplace_hfl.errors import HFLNotFittedError
from laplace_hfl.hyperparameters import HyperparameterMixin
from laplace_hfl.options import OPTION_NAMES, HFLOptions
from laplace_hfl.prediction import PredictionMixin
from laplace_hfl.serial import SerialMixin
from laplace_hfl.shards import fit_shard
from laplace_hfl.solver_choice import SolverMixin
from laplace_hfl.state import StateMixin
from laplace_hfl.tuning import TuningMixin
from laplace_hfl.weight_space import WeightSpaceMixin

__all__ = ["HFLMixin"]


class HFLMixin(
    SerialMixin,
    SolverMixin,
    HyperparameterMixin,
    DistributedMixin,
    PredictionMixin,
    TuningMixin,
    WeightSpaceMixin,
    StateMixin,
):
    """Hessian-free Laplace behaviour on top of laplace-torch's classes.

    Not used on its own: see :class:`laplace_hfl.HessianFreeLaplace` and
    :class:`laplace_hfl.HessianFreeLLLaplace`. Public calls on one estimator
    are serialised by its lock, and failed state-changing calls roll back
    (:mod:`laplace_hfl.serial`).
    """

    #: Whether ``state_dict`` carries the cached refit batches (last-layer
    #: features: small, and they make a loaded estimator predict right away).
    _state_holds_data = False

    # ------------------------------------------------------------------ options
    def _set_hfl_options(self, options: HFLOptions) -> None:
        self.hfl_settings = options.settings
        for name in OPTION_NAMES:
            if not hasattr(self.hfl_settings, name):  # the rest are attributes
                setattr(self, name, getattr(options, name))
        self._fitted = False
        self._minibatch_rows: int | None = None
        self._training_data: list[tuple[Any, Tensor]] | None = None
        self._train_loader: DataLoader | None = None
        self._training_index: list[Tensor] | None = None
        self._reset_solver_caches()
        self.last_diagnostics: RefitDiagnostics | None = None
        self._resolve_auto_options(options)

    def _resolve_auto_options(self, options: HFLOptions) -> None:
        """``compute_dtype="auto"`` becomes a dtype here (a rule of the
        device, the model's dtype and the tolerance:
        :func:`~laplace_hfl.engine.precision.auto_compute_dtype`);
        ``chunk_size="auto"`` becomes :data:`~laplace_hfl.engine.chunk_memory.CPU_CHUNK`
        until ``fit`` measures the memory (:meth:`_choose_chunk_size`). Both
        attributes always hold concrete values; why: ``_auto_reasons``
        (in ``la.last_diagnostics.choice``)."""
        self._auto_reasons: dict[str, str] = {}
        self._auto_dtype = isinstance(options.compute_dtype, str)
        # the value "auto" last chose (None: chunk_size was set)
        self._auto_chunk: int | None = None
        if self._auto_dtype:
            settings = self.hfl_settings
            self.compute_dtype, why = auto_compute_dtype(
                self._device.type, self._dtype, settings.variance_rtol, settings.target
            )
            self._set_auto_reason("compute_dtype", why)
        if isinstance(options.chunk_size, str):
            self.chunk_size = self._auto_chunk = CPU_CHUNK
            self._set_auto_reason(
                "chunk_size", f"chunk_size auto: {CPU_CHUNK} (not fitted yet)"
            )

    def _choose_chunk_size(self) -> None:
        """``chunk_size="auto"``: directions per product from the memory one
        direction takes and the device's free memory, once per fit
        (:func:`~laplace_hfl.engine.chunk_memory.choose_chunk`). A distributed
        fit keeps :data:`~laplace_hfl.engine.chunk_memory.CPU_CHUNK`: every
        rank must make the same number of collective passes. A ``chunk_size``
        the user assigned since is kept."""
        auto = getattr(self, "_auto_chunk", None)  # None: an older pickle
        if auto is None or self.chunk_size != auto:  # set, or reassigned since
            return
        with eval_mode(self.model):
            obj = self._objective()
            if obj.reduce is not None:
                chunk, why = CPU_CHUNK, f"{CPU_CHUNK} (distributed fit: ranks agree)"
                why = f"chunk_size auto: {why}"
            else:
                choice = choose_chunk(obj)
                chunk, why = choice.chunk_size, choice.reason
        self.chunk_size = self._auto_chunk = chunk
        self._set_auto_reason("chunk_size", why)

    def _set_auto_reason(self, option: str, why: str) -> None:
        """Record why ``"auto"`` chose ``option``'s value. The dict is
        replaced, never edited in place: a failed call's rollback restores
        attributes, so a reason written before it failed goes with it."""
        self._auto_reasons = {**self._auto_reasons, option: why}

    @property
    def auto_choices(self) -> dict[str, str]:
        """Why ``"auto"`` chose the values of ``compute_dtype`` and
        ``chunk_size``, by option, for the options still holding what it
        chose (also in ``last_diagnostics.choice``); empty where both were
        set explicitly."""
        reasons = dict(getattr(self, "_auto_reasons", {}))
        if getattr(self, "_auto_chunk", None) != self.chunk_size:
            reasons.pop("chunk_size", None)
        return reasons

    def _hfl_options(self) -> dict[str, Any]:
        """The options in force by name (``hfl_settings`` and the attributes,
        which may have been reassigned since construction)."""
        return {
            name: getattr(self.hfl_settings, name, getattr(self, name, None))
            for name in OPTION_NAMES
        }

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
        """Before a fit ``H`` is the zero curvature, as laplace-torch's
        ``torch.zeros(P, P)`` (None while ``P`` is unknown: a last layer not
        yet found)."""
        self.H = self._zero_curvature_operator()

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
        # Eval-mode flags of our own: another thread may .train() the model.
        module = private_modules(module)
        first_out, loss, n_seen, input_ndim = None, 0.0, 0, None
        cached: list[tuple[Any, Tensor]] | None = [] if cache else None
        with torch.no_grad(), buffers_kept(self.model):
            for data in train_loader:
                X, y = split_batch(data, self.dict_key_y, self.dict_key_x)
                X = to_compute(X, device, self._dtype)
                y = to_compute(y, device, self._dtype)
                check_finite_batch(X, y, n_seen)
                if cache == "features":
                    out, phi = module.forward_with_features(X)
                else:
                    out = module(X)
                check_output(out)
                check_targets(curvature_likelihood(self.likelihood), out, y)
                batch = batch_loss(
                    curvature_likelihood(self.likelihood),
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
                    input_ndim = X.ndim if isinstance(X, Tensor) else None
                if cached is not None:
                    inputs = phi if cache == "features" else X
                    cached.append(
                        (
                            to_compute(inputs, device, dtype),
                            to_compute(y, device, dtype),
                        )
                    )
        if n_seen == 0 and not is_distributed():  # empty shards are fine
            raise ValueError(
                "train_loader yielded no batches; HFL needs the training data "
                "the MAP was fitted on."
            )
        self._input_ndim = input_ndim
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

        Where the dense solver is used with ``target="ggn"`` (``solver="dense"``,
        or ``"auto"`` choosing it: its probe runs here), the data GGN is formed
        here, as FullLaplace does, so that the first ``sample``, ``pred_type="nn"``
        call or prediction only factorises it with the prior. Otherwise no
        curvature is computed here: HFL's work happens at prediction time (and
        is cached per prior precision and noise).

        Parameters
        ----------
        train_loader : torch.utils.data.DataLoader
            Batches ``(X, y)`` or dict batches with ``dict_key_y``; must be the
            data the MAP was trained on. ``train_loader.dataset`` gives ``N``.
            In a distributed fit (a default process group of several
            processes), this rank's shard: a ``DistributedSampler`` loader
            (its padding is dropped; ``N`` is then ``len(dataset)``) or any
            per-rank subset (``N`` is the sum over ranks); see
            :mod:`laplace_hfl.distributed`.
            It is iterated again at prediction time (all-weights HFL), so it
            must be deterministic (no random augmentation).
        override : bool, default=True
            False (after a first fit) adds this data's curvature to the earlier
            fits', as laplace-torch's online fit does: ``loss`` and ``n_data``
            add up, ``H`` and every refit then run over all batches seen (at
            the current MAP, the model's parameters now). Needs
            ``cache_data=True`` on every call and a single-process fit;
            refused on the last layer, as in laplace-torch.
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
            ``override=False`` without cached data or in a distributed fit.
        NotImplementedError
            ``minibatch_epochs`` in a distributed fit.
        laplace_hfl.distributed.HFLDistributedError
            Another rank's fit failed, or the ranks hold different MAPs.
        """
        refit_batch_size = as_int("refit_batch_size", refit_batch_size, 1)
        override = as_bool("override", override)
        if not override and isinstance(self, LLLaplace):
            raise ValueError(
                "Last-layer Laplace approximations do not support `override=False` "
                "(as in laplace-torch): fit once on all data, or use "
                "subset_of_weights='all' for an online fit."
            )
        cache_data = as_bool("cache_data", cache_data)
        accumulate = not override and self._fitted
        if accumulate:
            self._check_online_fit(cache_data)
        progress_bar = as_bool("progress_bar", progress_bar)
        dataset_size(train_loader)  # before any pass: IterableDataset refused
        check_one_dtype(self.model)
        if self.minibatch_epochs is not None and is_distributed():
            raise NotImplementedError(
                "minibatch_epochs is not available in a distributed fit (ranks "
                "would take different numbers of steps); use the full-batch "
                "refits, whose data passes are split across the ranks."
            )
        self.refit_batch_size = refit_batch_size
        self.cache_data = cache_data
        # This rank's shard; totals agreed across ranks (see distributed.py).
        shard = fit_shard(self._fit_pass, train_loader, refit_batch_size)
        if accumulate:  # the new data's term is added: refits use all data seen
            shard = self._accumulated(shard)
        # Commit state only after every check passed.
        # a 0-dim tensor in the model's dtype, as laplace-torch's summed loss
        self.loss = torch.tensor(shard.loss, dtype=self._dtype, device=self._device)
        self.n_outputs = shard.n_outputs
        self.n_data = shard.n_data
        # Minibatch refits step over the loader's batches, cached or not.
        self._minibatch_rows = getattr(train_loader, "batch_size", None)
        self.mean = shard.mean
        self._training_data = shard.cached
        self._train_loader = shard.loader if shard.cached is None else None
        self._training_index = shard.index
        self._fit_likelihood = self.likelihood
        self._reset_solver_caches()
        self._fitted = True
        self._choose_chunk_size()
        self.H = self._curvature_operator()
        self.progress_bar = self.progress_bar or progress_bar
        self._fit_curvature()  # the data GGN where the dense solver uses it
        if self.amortize is not None:
            with eval_mode(self.model):
                self._amortized_state(self._objective())

    def _check_online_fit(self, cache_data: bool) -> None:
        """``fit(..., override=False)`` keeps every batch seen: refused, before
        any change, where the batches are not kept in memory."""
        if is_distributed() or self._training_data is None or not cache_data:
            raise ValueError(
                "fit(..., override=False) adds the new data's curvature by keeping "
                "every training batch seen in memory; this needs cache_data=True "
                "on every call (and the earlier fits' data cached) and a "
                "single-process fit. Otherwise pass all data in one DataLoader "
                "with override=True."
            )

    def _accumulated(self, shard: Any) -> Any:
        """The new shard with the earlier fits' batches, loss and ``N`` added
        (laplace-torch's online fit: ``H``, ``loss`` and ``n_data`` add up);
        the MAP is the current one, as in laplace-torch."""
        if shard.n_outputs != self.n_outputs:
            raise ValueError(
                f"fit(..., override=False): the model now has {shard.n_outputs} "
                f"outputs, the earlier fits {self.n_outputs}."
            )
        offset = int(self.n_data)
        old_index = self._training_index or []
        return dataclasses.replace(
            shard,
            loss=float(self.loss) + shard.loss,
            n_data=offset + shard.n_data,
            cached=list(self._training_data) + list(shard.cached),
            index=list(old_index) + [i + offset for i in shard.index],
        )

    # ---------------------------------------------------------------- refits
    def _objective(self) -> LaplaceObjective:
        self._check_hyperparameters()
        self._check_fit_likelihood()
        module, layout, fixed = self._refit_module()
        dtype = self.compute_dtype
        return LaplaceObjective(
            forward=make_forward(module, layout, fixed),
            batches=self._training_batches,
            likelihood=curvature_likelihood(self._fit_likelihood),
            h_factor=float(self._H_factor.detach()),
            prior_precision=self.prior_precision_diag.to(dtype),
            prior_mean=self.prior_mean.to(dtype),
            theta_map=self.mean.detach().to(dtype),
            reduce=data_reducer(),
        )

    def _check_fit_likelihood(self) -> None:
        if self.likelihood != self._fit_likelihood:
            raise ValueError(
                f"la.likelihood was changed from {self._fit_likelihood!r} (used "
                f"for the curvature at fit) to {self.likelihood!r}. The curvature "
                "is fixed at fit: create a new Laplace with the new likelihood "
                "and fit it."
            )

    def _hyper_key(self) -> tuple:
        """What the solvers' caches are keyed on: the hyperparameters by value
        (the prior as a device-side snapshot, no host copy of ``P`` floats)."""
        return (
            TensorKey(self.prior_precision),
            TensorKey(self.prior_mean),
            float(self.sigma_noise),
            float(self.temperature),
            self.hfl_settings,
        )

    @property
    def map_gradient_norm(self) -> float:
        """``||grad L(theta_MAP)||``: how stationary the MAP is.

        Computed by the first exact prediction; ``nan`` before that (and in
        amortised mode, which never needs it).
        """
        solver = self._solver_object
        base = None if solver is None else solver.base
        return float("nan") if base is None else base.map_grad_norm

    # ------------------------------------------- public seam for tools (bench)
    def objective(self) -> LaplaceObjective:
        """The refit objective of the current fit and hyperparameters.

        What every HFL solve works on: the functional forward at the MAP,
        the training batches, the likelihood, ``h_factor`` (``1/sigma^2`` or
        1, over the temperature), the prior precision and mean in the compute
        dtype. Built anew on each call (cheap: no data pass), so it follows
        later changes of the prior precision, ``sigma_noise`` or temperature.

        Returns
        -------
        LaplaceObjective
            See :class:`laplace_hfl.engine.functional.LaplaceObjective`.

        Raises
        ------
        HFLNotFittedError
            Before ``fit``.
        ValueError
            Invalid hyperparameters, or ``likelihood`` changed since ``fit``.
        """
        self._check_H_init()
        return self._objective()

    def query_inputs(self, X: Any) -> Any:
        """The inputs of the refit module for raw query inputs ``X``.

        The network's inputs for all-weights HFL; the last layer's features
        for last-layer HFL (computed by the frozen body, in eval mode). In the
        compute dtype on the model's device; ``objective().forward(theta, ·)``
        takes them.

        Parameters
        ----------
        X : Tensor or Mapping
            Query inputs, batch first (a dict batch for dict models).

        Returns
        -------
        Tensor or Mapping
        """
        self._check_H_init()
        with eval_mode(self.model), torch.set_grad_enabled(self.enable_backprop):
            return self._query_inputs(X)

    def glm_predictive(
        self, X: Any, joint: bool = False, diagonal_output: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Linearised (GLM) predictive mean and output covariance at ``X``.

        The functional ``(f_mu, f_var)`` before any link function: for
        classification laplace-torch's ``la(x)`` returns probabilities only,
        and its ``_glm_predictive_distribution`` is private to it.

        Parameters
        ----------
        X : Tensor or Mapping
            Query inputs ``(B, ...)``.
        joint : bool, default=False
            Joint covariance over all ``B * C`` outputs.
        diagonal_output : bool, default=False
            Only the per-output variances ``(B, C)``.

        Returns
        -------
        f_mu : Tensor
            ``(B, C)`` (flattened ``(B * C,)`` when ``joint``).
        f_var : Tensor
            ``(B, C, C)``; ``(B * C, B * C)`` when ``joint``; ``(B, C)`` when
            ``diagonal_output``.
        """
        return self._glm_predictive_distribution(X, joint, diagonal_output)

    def refit_preconditioner(
        self, rebuild: bool = False
    ) -> tuple[str, Callable[[Tensor], Tensor] | None]:
        """The preconditioner of the CG refits for the current hyperparameters.

        Chosen as the refits choose it (``preconditioner``,
        ``precondition_rank``; ``"auto"`` probes); its data part (KFAC
        factors or Nyström sketch) is built once per fit and reused.

        Parameters
        ----------
        rebuild : bool, default=False
            Drop the cached factors / sketch (and automatic choices) first, so
            that the build itself can be timed.

        Returns
        -------
        name : {"none", "kfac", "nystrom"}
        apply : callable or None
            ``M^{-1}`` applied to residual rows ``(m, P) -> (m, P)``; ``None``
            for ``"none"``.
        """
        obj = self.objective()
        if rebuild:
            self._reset_solver_caches()
        with eval_mode(self.model):
            method = self._preconditioner(obj)
        return method.name, method.apply(obj.h_factor, obj.prior_precision)

    @property
    def preconditioner_sketch(self) -> NystromSketch | None:
        """The Nyström sketch of the GGN built for the refits, if any.

        ``U`` ``(P, r)`` holds the ``r`` directions it resolves (at most the
        rank asked for), ``products`` its cost in GGN-vector products;
        ``None`` before a Nyström-preconditioned solve.
        """
        method = self._preconds.get("nystrom")
        return None if method is None else method.sketch

    def amortized_samples(self) -> AmortizedState:
        """The amortised posterior samples for the current hyperparameters.

        Drawn on first use (at ``fit`` in amortised mode) and redrawn when the
        hyperparameters change.

        Returns
        -------
        AmortizedState
            ``samples`` ``(S, P)`` and each sample's solver ``residual`` and
            ``iterations``.

        Raises
        ------
        ValueError
            The estimator is not in amortised mode (``amortize=None``).
        """
        if self.amortize is None:
            raise ValueError(
                "amortized_samples() needs amortised mode: construct the "
                "estimator with amortize=S."
            )
        obj = self.objective()
        with eval_mode(self.model):
            return self._amortized_state(obj)
