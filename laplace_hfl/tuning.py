"""Prior-precision tuning and the marginal likelihood of the HFL shell."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from laplace_hfl.batches import eval_mode

__all__ = ["TuningMixin"]

_NO_MARGLIK = (
    "HFL never forms the posterior precision, so it has no log-determinant and "
    "no Laplace marginal likelihood. Tune the prior precision by grid search "
    "on validation data instead: la.optimize_prior_precision(method='gridsearch', "
    "val_loader=val_loader)."
)


class TuningMixin:
    """``optimize_prior_precision`` and ``log_marginal_likelihood``."""

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
    def log_det_posterior_precision(self) -> Tensor:
        raise NotImplementedError(_NO_MARGLIK)
