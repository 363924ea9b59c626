"""``full()`` of the curvlinops backends builds its identity where the model is.

The dense curvature is ``linop @ I``; ``I`` must have the parameters' device
(else ``FullLaplace`` cannot fit a model on CUDA) and dtype (else the curvature
of a float64 model is computed in float32: relative error ~1e-8).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from laplace import FullLaplace, FullLLLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian


def _model_and_loader(device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    model = model.to(device=device, dtype=dtype)
    X = torch.randn(16, 3, device=device, dtype=dtype)
    y = torch.randn(16, 2, device=device, dtype=dtype)
    return model, DataLoader(TensorDataset(X, y), batch_size=8)


def _recording(backend: type) -> tuple[type, list[tuple[torch.device, torch.dtype]]]:
    """``backend`` whose linear operator records what ``full()`` multiplies by."""
    seen: list[tuple[torch.device, torch.dtype]] = []

    class Recording(backend):
        @property
        def _linop_context(self):
            linop = super()._linop_context

            class RecordingLinop(linop):
                def __matmul__(self, X):
                    seen.append((X.device, X.dtype))
                    return super().__matmul__(X)

            return RecordingLinop

    return Recording, seen


@pytest.mark.parametrize("laplace_class", [FullLaplace, FullLLLaplace])
@pytest.mark.parametrize("backend", [CurvlinopsGGN, CurvlinopsEF, CurvlinopsHessian])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_multiplies_by_identity_of_parameters_dtype(laplace_class, backend, dtype):
    model, loader = _model_and_loader("cpu", dtype)
    recording, seen = _recording(backend)
    la = laplace_class(model, "regression", backend=recording)
    la.fit(loader)
    assert seen, "full() did not multiply the linear operator by a matrix"
    assert all(s == (torch.device("cpu"), dtype) for s in seen), seen
    assert la.H.dtype == dtype


def test_full_ggn_of_float64_model_has_float64_accuracy():
    """``H`` equals the GGN ``J^T J`` of a float64 regression model to 1e-12."""
    model, loader = _model_and_loader("cpu", torch.float64)
    la = FullLaplace(model, "regression", backend=CurvlinopsGGN)
    la.fit(loader)
    X = loader.dataset.tensors[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (X,)))(params)
    J = torch.cat([j.reshape(X.shape[0] * 2, -1) for j in jac.values()], dim=1)
    torch.testing.assert_close(la.H, J.T @ J, rtol=1e-12, atol=1e-12)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA")
@pytest.mark.parametrize("laplace_class", [FullLaplace, FullLLLaplace])
def test_full_laplace_fits_on_cuda(laplace_class):
    """The default backend (``CurvlinopsGGN``) fits on CUDA, as on the CPU."""
    model, loader = _model_and_loader("cuda", torch.float64)
    model_cpu = copy.deepcopy(model).cpu()
    la = laplace_class(model, "regression")
    la.fit(loader)
    assert la.H.device.type == "cuda"
    X, y = loader.dataset.tensors
    loader_cpu = DataLoader(TensorDataset(X.cpu(), y.cpu()), batch_size=8)
    la_cpu = laplace_class(model_cpu, "regression")
    la_cpu.fit(loader_cpu)
    torch.testing.assert_close(la.H.cpu(), la_cpu.H, rtol=1e-10, atol=1e-12)
    f_mu, f_var = la(X[:4])
    assert f_mu.device.type == "cuda" and f_var.device.type == "cuda"
