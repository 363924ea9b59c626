"""Saving and restoring a fitted HFL estimator (``state_dict``)."""

from __future__ import annotations

from typing import Any

from laplace_hfl.amortized import AmortizedState

__all__ = ["StateMixin"]


class StateMixin:
    """``state_dict`` / ``load_state_dict``: never a DataLoader."""

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
        self._fit_likelihood = state_dict["likelihood"]
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
