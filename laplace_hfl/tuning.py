"""Prior-precision tuning and the marginal likelihood of the HFL shell."""

from __future__ import annotations

from typing import Any

from laplace.utils.utils import validate
from torch import Tensor
from torch.linalg import LinAlgError

from laplace_hfl.batches import eval_mode
from laplace_hfl.gridsearch import check_loss, run_gridsearch

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
            For regression pass a loss that scores the variance,
            ``loss=laplace_hfl.gridsearch.gaussian_nll_loss(la.sigma_noise)``:
            laplace-torch's default (MSE of the mean) ignores the prior.

        Raises
        ------
        NotImplementedError
            ``method="marglik"``.
        ValueError
            ``val_loader`` missing.

        Warns
        -----
        VarianceBlindLossWarning
            Regression with a loss that ignores the predictive variance.
        GridSearchCostWarning
            The first grid value predicts a long search (estimate given).
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
        check_loss(self.likelihood, kwargs.get("loss"))
        with eval_mode(self.model):
            super().optimize_prior_precision(
                pred_type=pred_type, method=method, **kwargs
            )

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
        when it will take long (see :mod:`laplace_hfl.gridsearch`)."""

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

    # -------------------------------------------------------------- refusals
    def log_marginal_likelihood(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not available: raises ``NotImplementedError`` naming grid search."""
        raise NotImplementedError(_NO_MARGLIK)

    @property
    def log_det_posterior_precision(self) -> Tensor:
        raise NotImplementedError(_NO_MARGLIK)
