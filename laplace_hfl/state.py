"""Saving and restoring a fitted HFL estimator (``state_dict``).

The state is flat: every value is a tensor, a number, a string, a bool,
``None`` or a list of those, so it loads with ``torch.load(weights_only=True)``
(no pickle) in every mode. It never holds a DataLoader.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from laplace_hfl.engine.amortized import AmortizedState
from laplace_hfl.engine.batches import slice_batch
from laplace_hfl.engine.functional import make_forward
from laplace_hfl.engine.keys import TensorKey
from laplace_hfl.engine.refit import RefitSettings
from laplace_hfl.engine.validation import curvature_likelihood
from laplace_hfl.options import validate_hfl_options
from laplace_hfl.state_checks import (
    check_state_batches,
    check_state_map,
    check_state_numbers,
    check_state_tensor,
)

__all__ = ["StateMixin", "architecture_fingerprint"]

#: Keys every HFL state has (last-layer states add ``data_*`` and
#: ``_last_layer_name``).
STATE_KEYS = (
    "mean", "loss", "prior_mean", "prior_precision", "sigma_noise", "n_data",
    "n_outputs", "likelihood", "temperature", "enable_backprop", "cls_name",
    "architecture", "hfl_target", "hfl_eps", "hfl_rtol", "hfl_max_iter",
    "hfl_max_newton", "hfl_compute_dtype", "hfl_amortize", "training_X",
    "training_y", "amortized_samples",
)  # fmt: skip


def architecture_fingerprint(model: torch.nn.Module) -> list[str]:
    """``"name:shape:requires_grad"`` for every parameter of ``model``."""
    return [
        f"{n}:{tuple(p.shape)}:{bool(p.requires_grad)}"
        for n, p in model.named_parameters()
    ]


def _scalar(value: Any) -> float:
    return (
        float(value.detach().cpu().reshape(-1)[0])
        if torch.is_tensor(value)
        else float(value)
    )


class StateMixin:
    """``state_dict`` / ``load_state_dict``: never a DataLoader, never pickle."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore the estimator, as flat values.

        All-weights HFL stores no training data: after ``load_state_dict``
        call ``fit(train_loader)`` again before predicting (or, in amortised
        mode, predict with the stored samples). Last-layer HFL stores its
        cached features and predicts right away.

        Returns
        -------
        dict
            Tensors, numbers, strings, bools, ``None`` and lists of those:
            ``torch.save`` it and ``torch.load(path, weights_only=True)`` it.
        """
        self._check_H_init()
        s = self.hfl_settings
        data = self._training_data if self._state_holds_data else None
        stored = self._stored_samples()
        amortized = None if stored is None else stored[0]
        state: dict[str, Any] = {
            "mean": self.mean,
            "loss": float(self.loss),
            "prior_mean": self.prior_mean,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "n_data": int(self.n_data),
            "n_outputs": int(self.n_outputs),
            "likelihood": str(self.likelihood),
            "temperature": _scalar(self.temperature),
            "enable_backprop": bool(self.enable_backprop),
            "cls_name": self.__class__.__name__,
            "architecture": architecture_fingerprint(self.model),
            "hfl_target": s.target,
            "hfl_eps": float(s.eps),
            "hfl_rtol": float(s.rtol),
            "hfl_max_iter": int(s.max_iter),
            "hfl_max_newton": int(s.max_newton),
            "hfl_compute_dtype": str(self.compute_dtype),
            "hfl_amortize": self.amortize,
            "hfl_amortize_deflation": self.amortize_deflation,
            "training_X": None if data is None else [X for X, _ in data],
            "training_y": None if data is None else [y for _, y in data],
            "amortized_samples": None if amortized is None else amortized.samples,
        }
        if stored is not None:
            key = stored[1]
            state.update(
                amortized_residual=amortized.residual,
                amortized_iterations=amortized.iterations,
                amortized_prior_precision=key[0].values.flatten().tolist(),
                amortized_prior_mean=key[1].values.flatten().tolist(),
                amortized_sigma_noise=float(key[2]),
                amortized_temperature=float(key[3]),
            )
        return state

    def _check_state_class(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise ValueError(
                f"load_state_dict needs the dict from la.state_dict(), got "
                f"{type(state_dict).__name__}."
            )
        if state_dict.get("cls_name") != self.__class__.__name__:
            raise ValueError(
                f"State of {state_dict.get('cls_name')!r} cannot be loaded into "
                f"{self.__class__.__name__}; check subset_of_weights and "
                "hessian_structure."
            )
        missing = [k for k in STATE_KEYS if k not in state_dict]
        if missing:
            raise ValueError(
                f"The state is missing the keys {missing}: it was not written by "
                "this version's la.state_dict() (or was edited). Save it again "
                "with la.state_dict()."
            )
        ours = architecture_fingerprint(self.model)
        theirs = list(state_dict["architecture"])
        if ours != theirs:
            diff = next(
                (f"{a!r} vs {b!r}" for a, b in zip(theirs, ours) if a != b),
                f"{len(theirs)} vs {len(ours)} parameters",
            )
            raise ValueError(
                "The state belongs to a different architecture (parameter names, "
                f"shapes or requires_grad switches differ: state {diff} here). Load "
                "it into the same model with the same requires_grad switches."
            )

    def _checked_state_values(
        self, state: dict[str, Any]
    ) -> tuple[RefitSettings, list | None, AmortizedState | None]:
        """Every value of ``state`` within the constructor's rules
        (:mod:`laplace_hfl.state_checks`); changes nothing."""
        mean = check_state_tensor(state, "mean", (self.n_params,))
        check_state_numbers(state)
        try:
            settings = validate_hfl_options(
                self.likelihood,
                self.enable_backprop,
                {
                    **self._hfl_options(),
                    "eps": state["hfl_eps"],
                    "target": state["hfl_target"],
                    "rtol": state["hfl_rtol"],
                    "max_iter": state["hfl_max_iter"],
                    "max_newton": state["hfl_max_newton"],
                },
            ).settings
        except ValueError as err:
            raise ValueError(f"The state's HFL settings are invalid: {err}") from None
        module, layout, _ = self._refit_module()
        named = dict(module.named_parameters())
        weights = torch.cat([named[n].detach().reshape(-1) for n in layout.names])
        check_state_map(mean, weights)
        batches = check_state_batches(
            state, state["n_outputs"], curvature_likelihood(state["likelihood"])
        )
        if batches is not None:
            self._check_state_forward(batches, mean, state["n_outputs"])
        amortized = None
        if state["amortized_samples"] is not None:
            samples = check_state_tensor(
                state, "amortized_samples", (int(self.amortize), self.n_params)
            )
            amortized = AmortizedState(
                samples, state["amortized_residual"], state["amortized_iterations"]
            )
        return settings, batches, amortized

    def _check_state_forward(
        self, batches: list, mean: torch.Tensor, n_outputs: int
    ) -> None:
        """The refit module maps each cached batch to ``(rows, n_outputs)``."""
        module, layout, fixed = self._refit_module()
        forward = make_forward(module, layout, fixed)
        theta = mean.detach().to(self.compute_dtype)
        for i, (X, y) in enumerate(batches):
            try:
                with torch.no_grad():
                    out = forward(theta, slice_batch(X, 0, 1))
            except (RuntimeError, ValueError, TypeError) as err:
                raise ValueError(
                    f"State key 'training_X': batch {i} does not fit the model "
                    f"({type(err).__name__}: {err}). Save the state again with "
                    "la.state_dict() from a fitted estimator."
                ) from None
            if tuple(out.shape) != (1, n_outputs):
                raise ValueError(
                    f"State key 'training_X': batch {i} gives outputs "
                    f"{tuple(out.shape)[1:]}, the state has {n_outputs}. Save "
                    "the state again with la.state_dict() from a fitted estimator."
                )

    def _state_compute_dtype(self, stored: Any) -> torch.dtype:
        """The compute dtype a loaded state runs in: the state's own where
        this estimator was built with ``compute_dtype="auto"`` (the state was
        fitted, and its refit batches cached, in it), else this estimator's
        (:meth:`load_state_dict` then checks that they agree)."""
        if getattr(self, "_auto_dtype", False):
            for dtype in (torch.float32, torch.float64):
                if stored == str(dtype):
                    return dtype
        return self.compute_dtype

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        The numerical HFL settings (``eps``, ``rtol``, ``max_iter``,
        ``max_newton``) are restored; the structural ones must match.

        Raises
        ------
        ValueError
            Missing keys, different estimator class, architecture, parameter
            count, likelihood, ``target``, ``compute_dtype`` (an estimator
            built with ``compute_dtype="auto"`` adopts the state's) or
            ``amortize``.
        """
        self._check_state_class(state_dict)
        mean = state_dict["mean"]
        if self.n_params is not None and (
            not torch.is_tensor(mean) or mean.numel() != self.n_params
        ):
            raise ValueError(
                f"State has {len(mean)} parameters, this model "
                f"{self.n_params}; use the same model and requires_grad switches."
            )
        if state_dict["likelihood"] != self.likelihood:
            raise ValueError(
                f"State was fitted with likelihood={state_dict['likelihood']!r}, "
                f"this estimator uses {self.likelihood!r}."
            )
        compute_dtype = self._state_compute_dtype(state_dict["hfl_compute_dtype"])
        for key, ours in (
            ("hfl_target", self.hfl_settings.target),
            ("hfl_compute_dtype", str(compute_dtype)),
            ("hfl_amortize", self.amortize),
            ("hfl_amortize_deflation", self.amortize_deflation),
            ("enable_backprop", bool(self.enable_backprop)),
        ):
            if state_dict.get(key) != ours:  # a state older than an option: None
                name = key.removeprefix("hfl_")
                raise ValueError(
                    f"State was fitted with {name}={state_dict[key]!r}, this "
                    f"estimator uses {ours!r}: construct it with "
                    f"{name}={state_dict[key]!r}."
                )
        # the checks below read it; a failed load puts it back (a transaction)
        adopted = compute_dtype != self.compute_dtype  # "auto" adopts the state's
        self.compute_dtype = compute_dtype
        settings, batches, amortized = self._checked_state_values(state_dict)
        # Everything is checked: commit.
        if adopted:
            name = str(compute_dtype).removeprefix("torch.")
            self._set_auto_reason(
                "compute_dtype", f"compute_dtype auto: {name} (the loaded state's)"
            )
        self.prior_precision = state_dict["prior_precision"]
        self.sigma_noise = state_dict["sigma_noise"]
        self.temperature = state_dict["temperature"]
        self.prior_mean = state_dict["prior_mean"]
        self.hfl_settings = settings
        self.mean = state_dict["mean"]
        self.loss = state_dict["loss"]
        self.n_data = state_dict["n_data"]
        self.n_outputs = state_dict["n_outputs"]
        self._fit_likelihood = state_dict["likelihood"]
        self._training_data = batches
        self._train_loader = None
        self._reset_solver_caches()
        if amortized is not None:
            key = (
                _stored_key(
                    state_dict["amortized_prior_precision"], self.prior_precision
                ),
                _stored_key(state_dict["amortized_prior_mean"], self.prior_mean),
                state_dict["amortized_sigma_noise"],
                state_dict["amortized_temperature"],
                settings,
            )
            self._restore_samples(amortized, key)
        self._fitted = True
        if self._training_data is not None:  # chunk_size="auto" can measure
            self._choose_chunk_size()
        self.H = self._curvature_operator()


def _stored_key(values: list[float], live: Tensor) -> TensorKey:
    """The cache key of hyperparameter values stored as a list: shaped,
    typed and placed as the live tensor where the counts agree (so that the
    values the samples were drawn for compare equal to the same values now)."""
    t = torch.as_tensor(values, dtype=live.dtype, device=live.device)
    return TensorKey(t.reshape(live.shape) if t.numel() == live.numel() else t)
