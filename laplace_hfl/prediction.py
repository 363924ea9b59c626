"""The predictive side of the HFL shell: GLM predictive, functional variances,
samples of the linearised predictive."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from laplace.utils.enums import LinkApprox, PredType
from torch import Tensor

from laplace_hfl.engine.batches import batch_size, eval_mode, slice_batch
from laplace_hfl.engine.functional import output_jacobians
from laplace_hfl.engine.predictive import joint_covariance, marginal_covariance
from laplace_hfl.engine.progress import progress
from laplace_hfl.engine.validation import check_finite_result, check_query_rows
from laplace_hfl.weight_space import check_n_samples

__all__ = ["PredictionMixin"]


def _checked_sampler(name: str, summary: str) -> Callable[..., Tensor]:
    """laplace-torch's sampling method ``name`` (``functional_samples`` or
    ``predictive_samples``), its arguments checked first."""

    def method(
        self,
        x: Tensor | Mapping[str, Any],
        pred_type: str = "glm",
        n_samples: int = 100,
        diagonal_output: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        self._check_pred_type(pred_type)
        check_n_samples(n_samples)
        self._check_generator(generator)
        parent = getattr(super(PredictionMixin, self), name)
        return parent(x, pred_type, n_samples, diagonal_output, generator)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = summary + _SAMPLER_RAISES
    return method


_SAMPLER_RAISES = """
        Raises
        ------
        ValueError
            Unknown ``pred_type``.
        NotImplementedError
            ``pred_type="gp"``.
        """


class PredictionMixin:
    """``__call__``, ``functional_variance``/``covariance`` and samples.

    Relies on the core of :class:`laplace_hfl.base.HFLMixin` (``_objective``,
    ``_query_inputs``) and on :class:`laplace_hfl.solver_choice.SolverMixin`
    (``_solver``, ``_solve``, ``_base_point``).
    """

    def _check_ready(self, x: Any) -> None:
        self._check_H_init()
        if not isinstance(x, Tensor | Mapping):
            raise ValueError(
                f"Query inputs must be a torch.Tensor (or a dict-like batch), got "
                f"{type(x).__name__}; convert with torch.as_tensor(x, "
                "dtype=...) on the model's device."
            )
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
        with eval_mode(self.model):  # once: the nested uses below are free
            return self._glm_predictive(X, joint, diagonal_output)

    def _glm_predictive(
        self, X: Any, joint: bool, diagonal_output: bool
    ) -> tuple[Tensor, Tensor]:
        backprop = self.enable_backprop
        with eval_mode(self.model), torch.set_grad_enabled(backprop):
            Xq = self._query_inputs(X)
        with eval_mode(self.model):  # without Jacobians where the solver can
            direct = self._solver().predictive(
                self._objective, Xq, joint, self._solve_context()
            )
        if direct is not None:  # amortised: from the stored samples
            f_mu, f_var = direct
            check_finite_result(f_mu, "predictive means")
            check_finite_result(f_var, "predictive covariances")
            if joint:
                f_mu = f_mu.flatten()
            elif diagonal_output:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
            return f_mu.to(self._dtype), f_var.to(self._dtype)
        structured = None if joint or backprop else self._structured_predictive(Xq)
        if structured is not None:  # no Jacobian formed (a dense Linear refit)
            f_mu, f_var = structured
            check_finite_result(f_var, "predictive covariances")
            if diagonal_output:
                f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
            return f_mu.to(self._dtype), f_var.to(self._dtype)
        with eval_mode(self.model):
            obj = self._objective()
            theta = self._linearization_point(obj)
            moved = theta is not obj.theta_map
            B = batch_size(Xq, self.dict_key_x)
            C = self.n_outputs
            step = self._query_step(obj, C) if not joint else B
            mus, covs, Js_all, U_all = [], [], [], []
            starts = range(0, B, step)
            for start in progress(
                starts, desc="[HFL predict]", always=self.progress_bar
            ):
                Xc = slice_batch(Xq, start, start + step)
                with torch.set_grad_enabled(backprop):
                    Js, f = output_jacobians(obj.forward, theta, Xc)
                if moved:  # the mean stays the network's output at the MAP
                    with torch.set_grad_enabled(backprop):
                        f = obj.forward(obj.theta_map, Xc)
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

    def _structured_predictive(self, Xq: Any) -> tuple[Tensor, Tensor] | None:
        """Mean and ``J P^{-1} J^T`` per input without Jacobians where the
        refit module's structure allows it (the last-layer shell: a ``Linear``
        layer with the dense solver); ``None`` elsewhere."""
        return None

    def _linearization_point(self, obj) -> Tensor:
        """Where the query Jacobians are taken.

        The MAP, except for exact network refits (``target="hessian"``) from a
        MAP that is not a stationary point: their curvature is the Hessian at
        the minimum the unperturbed refit reached (the base point), and the
        Jacobians must be taken there too. Mixing ``J(theta_MAP)`` with the
        Hessian at a nearby minimum is silently wrong where the Hessian is
        nearly singular: a relative displacement of 3.5e-4 along a flat
        direction gave a 55% variance error on a two-weight network with
        prior 1e-4 (``tests/test_robust.py``, the test of a near-singular Hessian).
        """
        if not self.hfl_settings.curvature.at_base_point:
            return obj.theta_map
        base = self._base_point(obj)  # None: the solver refits nothing
        if base is None or torch.equal(base.theta, obj.theta_map):
            return obj.theta_map
        return base.theta

    def _solve_jacobians(self, Js: Tensor) -> tuple[Tensor, Tensor]:
        self._check_H_init()
        if not isinstance(Js, Tensor) or Js.ndim != 3:
            raise ValueError(
                "Jacobians must be a tensor of shape (batch, outputs, parameters), "
                f"got {getattr(Js, 'shape', type(Js).__name__)}; for one output "
                "use Js.unsqueeze(1)."
            )
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
            Jacobians ``(batch, outputs, parameters)``, used as given. With
            ``target="hessian"`` and a MAP that is not stationary, ``P`` is the
            Hessian at the minimum the unperturbed refit reached; predictions
            (``la(x)``) take their Jacobians there.

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
        """Posterior predictive; see laplace-torch's ``__call__``.

        ``pred_type="glm"``: the linearised predictive from refits.
        ``pred_type="nn"``: Monte Carlo through the network at ``n_samples``
        exact weight draws (:meth:`sample`), ``link_approx="mc"`` only;
        regression returns the sample mean and variance ``(B, C)``,
        classification the mean softmax. The model is evaluated with
        ``torch.func.functional_call``: its parameters are never overwritten.

        Raises
        ------
        ValueError
            Unknown ``pred_type`` or ``link_approx``; ``pred_type="nn"`` with
            ``link_approx`` other than ``"mc"``; invalid ``generator``.
        NotImplementedError
            ``pred_type="gp"``.
        IndefiniteHessianError
            ``pred_type="nn"``, ``target="hessian"`` and an indefinite ``P``.
        """
        self._check_pred_type(pred_type)
        if pred_type == PredType.NN or link_approx == LinkApprox.MC:
            check_n_samples(n_samples)
        if model_kwargs and pred_type != PredType.NN:
            raise TypeError(
                "HFL's predictive passes no extra model arguments; got "
                f"{sorted(model_kwargs)}. Wrap the model so that model(x) needs "
                "only x."
            )
        if pred_type == PredType.NN:
            if link_approx not in LinkApprox.__members__.values():
                raise ValueError(f"Unsupported link approximation {link_approx}.")
            if link_approx != LinkApprox.MC:
                raise ValueError(
                    "Only mc link approximation is supported for nn prediction "
                    f"type (got link_approx={link_approx!r}); pass link_approx='mc'."
                )
            self._check_generator(generator)
            likelihood = self.likelihood
            if likelihood == "reward_modeling":  # as laplace-torch: pairs at fit
                likelihood = "classification" if fitting else "regression"
            fs = self._nn_functional_samples(x, n_samples, generator, **model_kwargs)
            if likelihood == "regression":
                return fs.mean(dim=0), fs.var(dim=0)
            return torch.softmax(fs, dim=-1).mean(dim=0)
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
    def _check_pred_type(pred_type: str) -> None:
        """``"glm"`` and ``"nn"`` pass; ``"gp"`` is refused, others invalid."""
        if pred_type == PredType.GP:
            raise NotImplementedError(
                "pred_type='gp' is not available with HFL (it needs the kernel "
                "matrix of the training data); use pred_type='glm' (linearised "
                "predictive) or pred_type='nn' (Monte Carlo over weight samples)."
            )
        if pred_type not in PredType.__members__.values():
            raise ValueError(
                f"Only glm and nn supported as prediction types (got {pred_type!r})."
            )

    # Older name, still used by the tuning mixin.
    _require_glm = _check_pred_type

    # ------------------------------------------------------------ nn samples
    def _nn_functional_samples(
        self,
        X: Tensor | Mapping[str, Any],
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        **model_kwargs: Any,
    ) -> Tensor:
        """Network outputs at exact weight draws: ``(n_samples, B, C)``.

        Evaluated with ``functional_call`` at each draw, never by writing the
        draws into the model (laplace-torch's ``vector_to_parameters``).
        """
        if model_kwargs:
            raise TypeError(
                "HFL's nn predictive passes no extra model arguments; got "
                f"{sorted(model_kwargs)}. Wrap the model so that model(x) needs "
                "only x."
            )
        self._check_ready(X)
        _, thetas = self._weight_draws(n_samples, generator)
        backprop = self.enable_backprop
        with eval_mode(self.model), torch.set_grad_enabled(backprop):
            Xq = self._query_inputs(X)
            forward = self._objective().forward
            fs = torch.stack([forward(theta, Xq) for theta in thetas])
        if not backprop:
            fs = fs.detach()
        return fs.to(self._dtype)

    def _nn_predictive_samples(self, *args: Any, **kwargs: Any) -> Tensor:
        """:meth:`_nn_functional_samples` (same arguments), with the softmax
        applied unless the likelihood is regression."""
        fs = self._nn_functional_samples(*args, **kwargs)
        return fs if self.likelihood == "regression" else torch.softmax(fs, dim=-1)

    def _nn_predictive_classification(
        self, X: Tensor | Mapping[str, Any], n_samples: int = 100, **model_kwargs: Any
    ) -> Tensor:
        """laplace-torch's, without writing the draws into the model."""
        return self._nn_predictive_samples(X, n_samples, **model_kwargs).mean(dim=0)

    functional_samples = _checked_sampler(
        "functional_samples",
        """Samples of the function-space posterior ``(n_samples, B, C)``.

        ``pred_type="glm"``: of the linearised predictive; ``"nn"``: network
        outputs at exact weight draws.
        """,
    )
    predictive_samples = _checked_sampler(
        "predictive_samples",
        "Samples of the predictive (softmax applied for classification).",
    )
