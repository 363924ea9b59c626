"""Last-layer Hessian-free Laplace: ``Laplace(..., "last_layer", "hfl")``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from laplace.lllaplace import LLLaplace
from torch import Tensor, nn
from torch.nn.modules import module as nn_module
from torch.nn.utils import parameters_to_vector
from torch.utils.data import DataLoader

from laplace_hfl._docs import HFL_OPTIONS_DOC
from laplace_hfl.base import HFLMixin
from laplace_hfl.distributed import unwrap_model
from laplace_hfl.engine.batches import eval_mode, split_batch
from laplace_hfl.engine.functional import ParamLayout, to_compute
from laplace_hfl.engine.validation import (
    check_constructor_values,
    check_prior_precision,
)
from laplace_hfl.options import constructor_arguments, hfl_signature

__all__ = ["HessianFreeLLLaplace"]


class _StoreFeatures:
    """laplace-torch's feature hook as a picklable object (the original is a
    closure, which made ``pickle.dumps(la)`` fail)."""

    def __init__(self, extractor: nn.Module, name: str) -> None:
        self.extractor, self.name = extractor, name

    def __call__(self, _module: nn.Module, inputs: tuple, _output: Any) -> None:
        phi = inputs[0]
        self.extractor._features[self.name] = (
            phi if self.extractor.enable_backprop else phi.detach()
        )


def _plain_linear(layer: nn.Module) -> bool:
    """Whether calling ``layer`` is exactly ``F.linear(x, weight, bias)``: an
    ``nn.Linear`` whose ``forward`` is not overridden and that no hook changes
    (the extractor's own feature hook only reads). Otherwise the structured
    dense predictive would skip what the hooks or the override do to the
    output, so the refits go through the module call instead."""
    return (
        isinstance(layer, nn.Linear)
        and type(layer).forward is nn.Linear.forward
        and not layer._forward_pre_hooks
        and all(isinstance(h, _StoreFeatures) for h in layer._forward_hooks.values())
        and not nn_module._global_forward_hooks
        and not nn_module._global_forward_pre_hooks
    )


def _picklable_feature_hook(extractor: nn.Module) -> None:
    """Swap the extractor's closure hook on its last layer for
    :class:`_StoreFeatures` (same behaviour)."""
    layer = getattr(extractor, "last_layer", None)
    if layer is None:
        return
    for key, hook in list(layer._forward_hooks.items()):
        if getattr(hook, "__qualname__", "").startswith("FeatureExtractor._get_hook"):
            layer._forward_hooks[key] = _StoreFeatures(
                extractor, extractor._last_layer_name
            )


class HessianFreeLLLaplace(HFLMixin, LLLaplace):
    __doc__ = (
        """Hessian-free Laplace over the last (linear) layer.

    The network up to the last layer is fixed, so its features on the training
    data are computed once in :meth:`fit` and cached; refits then touch only the
    last layer. The output is linear in the last-layer weights, so Hessian and
    GGN coincide there and both targets converge to ``FullLLLaplace`` with any
    GGN backend. The state dict holds the cached features: a loaded estimator
    predicts without the training data.

    Parameters
    ----------
    model : torch.nn.Module
        The trained network; a deep copy is wrapped in laplace-torch's
        ``FeatureExtractor`` (the original is never modified).
    likelihood : {"regression", "classification"}
    sigma_noise, prior_precision, prior_mean, temperature, feature_reduction,
    dict_key_x, dict_key_y, backend, last_layer_name, backend_kwargs
        As in laplace-torch's ``LLLaplace``.
    asdl_fisher_kwargs : None
        Must be None, as in ``LLLaplace``.
"""
        + HFL_OPTIONS_DOC
    )

    _key = ("last_layer", "hfl")
    _state_holds_data = True

    @hfl_signature(LLLaplace)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments, options = constructor_arguments(
            LLLaplace, type(self).__name__, args, kwargs
        )
        if arguments["likelihood"] == "reward_modeling":
            raise NotImplementedError(
                "likelihood='reward_modeling' is available for "
                "subset_of_weights='all' HFL; the last-layer features of "
                "preference pairs are not separable from the pair axis."
            )
        # LLLaplace stores the prior bypassing its setter until the last layer
        # is found: check it here.
        check_prior_precision(arguments["prior_precision"])
        model = unwrap_model(arguments.pop("model"))  # DDP-wrapped: its .module
        check_constructor_values(
            model, arguments["sigma_noise"], arguments["temperature"]
        )
        name = arguments["last_layer_name"]
        if name is not None and name not in dict(model.named_modules()):
            raise ValueError(
                f"last_layer_name={name!r} is not a module of the model; "
                "pass a name from dict(model.named_modules()) (the final "
                "nn.Linear), or None to find it from the first batch."
            )
        super().__init__(model, **arguments)
        # LLLaplace.__init__ resets cooperative options: set ours afterwards.
        self._set_hfl_options(options)
        _picklable_feature_hook(self.model)

    def _fit_pass(self, train_loader: DataLoader) -> tuple:
        if self.n_params is None:  # the last layer is not known yet
            first = next(iter(train_loader), None)
            if first is None:
                raise ValueError(
                    "train_loader yielded no batches; HFL needs the training data "
                    "the MAP was fitted on (a rank with an empty shard needs "
                    "last_layer_name=... to find the last layer)."
                )
            self._locate_last_layer(first)
            self.prior_precision = self._prior_precision
            self.prior_mean = self._prior_mean
        frozen = [
            n
            for n, p in self.model.last_layer.named_parameters()
            if not p.requires_grad
        ]
        if frozen:
            raise ValueError(
                f"The last layer's parameters {frozen} have requires_grad=False, "
                "but last-layer HFL treats all of them as uncertain. Switch "
                "requires_grad on, or use subset_of_weights='all' (which keeps "
                "frozen parameters fixed)."
            )
        with eval_mode(self.model):
            first_out, loss, cached = self._iterate_checked(
                train_loader, self.model, "features"
            )
            if first_out is not None:  # None: an empty distributed shard
                with torch.no_grad():
                    phi = cached[0][0][: first_out.shape[0]].to(self._dtype)
                    relinked = self.model.last_layer(phi)
            if first_out is not None and (
                relinked.shape != first_out.shape
                or not torch.allclose(relinked, first_out, rtol=1e-4, atol=1e-5)
            ):
                raise ValueError(
                    "The last layer applied to the extracted features does not "
                    "reproduce the model's output; check last_layer_name and "
                    "feature_reduction."
                )
        mean = parameters_to_vector(self.model.last_layer.parameters()).detach().clone()
        return first_out, loss, cached, mean

    def _refit_module(self) -> tuple[nn.Module, ParamLayout, dict[str, Tensor]]:
        named = list(self.model.last_layer.named_parameters())
        layout = ParamLayout(
            tuple(n for n, _ in named), tuple(p.shape for _, p in named)
        )
        return self.model.last_layer, layout, {}

    def _release_transients(self) -> None:
        # The extractor's hook keeps the last layer's input of the last call,
        # which may be a tensor of a finished torch.func transform.
        features = getattr(getattr(self, "model", None), "_features", None)
        if features:
            features.clear()

    def _query_inputs(self, X: Any) -> Any:
        X = to_compute(X, self._device, self._dtype)
        _, phi = self.model.forward_with_features(X)
        return phi.to(self.compute_dtype)

    def _structured_predictive(self, Xq: Any) -> tuple[Tensor, Tensor] | None:
        layer = self.model.last_layer
        if (
            not _plain_linear(layer)
            or not isinstance(Xq, Tensor)
            or Xq.ndim != 2
            or not self._uses_dense(self.n_params)
            or tuple(n for n, _ in layer.named_parameters())
            not in (("weight",), ("weight", "bias"))
        ):
            return None
        return self._dense_linear_predictive(layer, Xq)

    def functional_variance_fast(self, X: Any) -> tuple[Tensor, Tensor]:
        f_mu, f_var = self._glm_predictive_distribution(X)
        return f_mu, torch.diagonal(f_var, dim1=-2, dim2=-1)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        data = getattr(self, "data", None)
        # Flat values only (weights_only loading): a pair becomes a list, a
        # UserDict/BatchEncoding a dict.
        if isinstance(data, Mapping):
            data = dict(data)
        elif data is not None:
            data = list(data)
        state["data"] = data
        state["_last_layer_name"] = self._last_layer_name
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_state_class(state_dict)
        if "_last_layer_name" not in state_dict or "data" not in state_dict:
            raise ValueError(
                "The state is missing the keys 'data'/'_last_layer_name' of a "
                "last-layer HFL state; save it again with la.state_dict()."
            )
        if self._last_layer_name != state_dict["_last_layer_name"]:
            raise ValueError(
                f"State was fitted with last_layer_name="
                f"{state_dict['_last_layer_name']!r}, this estimator uses "
                f"{self._last_layer_name!r}."
            )
        if self.n_params is None:
            data = state_dict.get("data")
            if data is None:
                raise ValueError(
                    "The state holds no batch to locate the last layer; pass "
                    "last_layer_name=... to the constructor."
                )
            self._locate_last_layer(data)
        super().load_state_dict(state_dict)

    def _locate_last_layer(self, data: Any) -> None:
        """Find the last layer with one batch and size the estimator from it."""
        X, y = split_batch(data, self.dict_key_y, self.dict_key_x)
        if not isinstance(data, Mapping):
            data = (to_compute(X, self._device, self._dtype), y)
        self.data = data
        if self.model.last_layer is None:  # else: found by a call that failed later
            with eval_mode(self.model):
                try:
                    self._find_last_layer(data)
                except StopIteration:
                    raise ValueError(
                        "Found no last layer: last-layer HFL needs a model whose "
                        "output comes from a final module with parameters (an "
                        "nn.Linear). Use subset_of_weights='all' for this model."
                    ) from None
            _picklable_feature_hook(self.model)
        params = list(self.model.last_layer.parameters())
        self.n_params = len(parameters_to_vector(params))
        self.n_layers = len(params)
