"""All-weights Hessian-free Laplace: ``Laplace(..., "all", "hfl")``."""

from __future__ import annotations

from typing import Any

import torch
from laplace.baselaplace import ParametricLaplace
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_hfl._docs import HFL_OPTIONS_DOC
from laplace_hfl.base import HFLMixin
from laplace_hfl.distributed import unwrap_model
from laplace_hfl.engine.batches import eval_mode
from laplace_hfl.engine.functional import ParamLayout, to_compute
from laplace_hfl.engine.validation import check_constructor_values
from laplace_hfl.options import constructor_arguments, hfl_signature

__all__ = ["HessianFreeLaplace"]


class HessianFreeLaplace(HFLMixin, ParametricLaplace):
    __doc__ = (
        """Hessian-free Laplace (HFL) over all weights that require grad.

    Estimates the linearised-Laplace predictive covariance ``J P^{-1} J^T``
    from the MAP and parameters re-optimised under the objective perturbed by
    ``-/+ eps f(x*)``, without forming or inverting any Hessian. The posterior
    precision ``P`` is that of laplace-torch's ``FullLaplace``: the GGN + prior
    (``target="ggn"``) or the exact Hessian + prior (``target="hessian"``).
    Memory is that of training plus ``chunk_size`` parameter vectors.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network (the MAP). Never modified.
    likelihood : {"regression", "classification"}
    sigma_noise, prior_precision, prior_mean, temperature, dict_key_x,
    dict_key_y, backend, backend_kwargs, asdl_fisher_kwargs
        As in laplace-torch's ``BaseLaplace``. ``backend`` is accepted for
        compatibility and unused (HFL needs no curvature backend).
"""
        + HFL_OPTIONS_DOC
        + """

    Examples
    --------
    >>> import laplace_hfl  # registers hessian_structure="hfl"
    >>> from laplace import Laplace
    >>> la = Laplace(model, "regression", "all", "hfl")  # doctest: +SKIP
    >>> la.fit(train_loader)  # doctest: +SKIP
    >>> f_mu, f_var = la(x_test)  # doctest: +SKIP
    """
    )

    _key = ("all", "hfl")

    @hfl_signature(ParametricLaplace)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments, options = constructor_arguments(
            ParametricLaplace, type(self).__name__, args, kwargs
        )
        model = unwrap_model(arguments.pop("model"))  # DDP-wrapped: its .module
        check_constructor_values(
            model, arguments["sigma_noise"], arguments["temperature"]
        )
        super().__init__(model, **arguments)
        if self.n_params == 0:
            raise ValueError(
                "Every parameter of the model has requires_grad=False, so there "
                "is no posterior to approximate. Switch requires_grad on for the "
                "parameters HFL should treat as uncertain."
            )
        self._set_hfl_options(options)

    def _fit_pass(self, train_loader: DataLoader) -> tuple:
        with eval_mode(self.model):
            first_out, loss, cached = self._iterate_checked(
                train_loader, self.model, "inputs" if self.cache_data else None
            )
        mean = parameters_to_vector(self.params).detach().clone()
        return first_out, loss, cached, mean

    def _refit_module(self) -> tuple[nn.Module, ParamLayout, dict[str, Tensor]]:
        dtype, refit = self.compute_dtype, []
        fixed: dict[str, Tensor] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                refit.append((name, p.shape))
            else:
                fixed[name] = p.detach().to(dtype)
        for name, b in self.model.named_buffers():
            fixed[name] = b.detach().to(dtype) if torch.is_floating_point(b) else b
        layout = ParamLayout(tuple(n for n, _ in refit), tuple(s for _, s in refit))
        return self.model, layout, fixed

    def _query_inputs(self, X: Any) -> Any:
        return to_compute(X, self._device, self.compute_dtype)
