"""The predictive side of the HFL shell: GLM predictive, functional variances,
samples of the linearised predictive."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from laplace.utils.enums import PredType
from torch import Tensor

from laplace_hfl.amortized import amortized_covariance
from laplace_hfl.batches import batch_size, eval_mode, slice_batch
from laplace_hfl.functional import output_jacobians
from laplace_hfl.predictive import joint_covariance, marginal_covariance
from laplace_hfl.validation import check_finite_result, check_query_rows
from laplace_hfl.weight_space import _NO_WEIGHT_SPACE

__all__ = ["PredictionMixin"]


class PredictionMixin:
    """``__call__``, ``functional_variance``/``covariance`` and samples.

    Relies on the core of :class:`laplace_hfl.base.HFLMixin` (``_objective``,
    ``_solve``, ``_amortized_state``, ``_query_inputs``).
    """

    def _check_ready(self, x: Any) -> None:
        self._check_H_init()
        if batch_size(x, self.dict_key_x) == 0:
            raise ValueError("HFL predictions need at least one input.")
        ndim = getattr(self, "_input_ndim", None)
        if (
            isinstance(x, Tensor)
            and ndim is not None
            and x.ndim != ndim
            and self.likelihood != "reward_modeling"  # pairs at fit, points later
        ):
            raise ValueError(
                f"Query inputs have shape {tuple(x.shape)} ({x.ndim}-D) but the "
                f"training inputs were {ndim}-D (batch first). For one input use "
                "x.unsqueeze(0)."
            )
        check_query_rows(x)

    def _glm_predictive_distribution(
        self,
        X: Tensor | Mapping[str, Any],
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
                    obj.forward, obj.theta_map, Xq, samples, joint=joint,
                    chunk_size=self.chunk_size,
                )  # fmt: skip
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
                check_finite_result(Js.detach(), "query Jacobians")
                U = self._solve(obj, Js.detach().reshape(-1, Js.shape[-1]))
                check_finite_result(U, "refit displacements P^-1 J^T")
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
        check_finite_result(f_var, "predictive covariances")
        out_dtype = self._dtype
        return f_mu.to(out_dtype), f_var.to(out_dtype)

    def _solve_jacobians(self, Js: Tensor) -> tuple[Tensor, Tensor]:
        self._check_H_init()
        self._check_jacobians(Js)
        check_query_rows(Js, "Jacobians")
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
        x: Tensor | Mapping[str, Any],
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
        ValueError
            Unknown ``pred_type`` (not one of laplace-torch's ``PredType``).
        NotImplementedError
            ``pred_type="nn"`` or ``"gp"``.
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
        known = [p.value for p in PredType]
        if pred_type not in known:
            raise ValueError(
                f"Unknown pred_type={pred_type!r}: laplace-torch knows {known}; "
                "HFL gives pred_type='glm'."
            )
        if pred_type != "glm":
            raise NotImplementedError(
                f"pred_type={pred_type!r} is not available with HFL: "
                + _NO_WEIGHT_SPACE
            )

    def functional_samples(
        self,
        x: Tensor | Mapping[str, Any],
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
        x: Tensor | Mapping[str, Any],
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
