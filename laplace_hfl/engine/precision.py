"""The precision of the refits that ``compute_dtype="auto"`` chooses.

A pure rule of the device type, the model's dtype, the refit target and the
variance tolerance in force (measured accuracies: ``docs/cost.md``,
"Precision of the refits"):

* a float64 model is refit in float64;
* on a CUDA device a ``target="ggn"`` refit runs its products (the passes over
  the data) in float32 and CG's recurrences, brackets and Rayleigh-Ritz step
  in float64 (:func:`laplace_hfl.engine.solvers.mixed_precision`), unless the
  variance tolerance asks for more than float32 products can certify
  (:data:`FLOAT32_CERTIFIES`, or the residual rule alone, which ``rtol``
  tighter than its default selects): then float64. TF32 is never switched
  on here (PyTorch leaves it off for float32 matrix products unless the user
  sets ``torch.backends.cuda.matmul.allow_tf32``);
* ``target="hessian"`` (Newton refits of the network, no mixed-precision
  path) refits in float64;
* devices without float64 (Apple ``mps``) use float32;
* everywhere else (the CPU) float64 throughout, as before the option existed:
  a CPU's float64 products cost about twice float32's, not the ~30-60x of a
  data-centre GPU's, and keep the variances exact to rounding.
"""

from __future__ import annotations

import torch

__all__ = ["FLOAT32_CERTIFIES", "auto_compute_dtype"]

#: Smallest relative variance tolerance that float32 products (with float64
#: recurrences) still certify: their bracket is that of ``A + E`` with
#: ``|E| ~ 1e-7 |A|``, and stops containing the float64 truth below ~1e-5
#: (``scripts/precision_choice.py``).
FLOAT32_CERTIFIES = 1e-5

#: Device types without float64 arithmetic.
_NO_FLOAT64 = ("mps",)


def auto_compute_dtype(
    device_type: str,
    model_dtype: torch.dtype,
    variance_rtol: float | None,
    target: str = "ggn",
) -> tuple[torch.dtype, str]:
    """The refit precision ``compute_dtype="auto"`` runs, and why.

    Parameters
    ----------
    device_type : str
        ``torch.device(...).type`` of the model (``"cpu"``, ``"cuda"``, ...).
    model_dtype : torch.dtype
        Dtype of the model's parameters.
    variance_rtol : float or None
        The variance tolerance in force
        (:attr:`laplace_hfl.engine.refit.RefitSettings.variance_rtol`; None:
        the residual rule alone, which ``rtol`` below its default selects).
    target : str, default="ggn"

    Returns
    -------
    dtype : torch.dtype
        ``torch.float64`` or ``torch.float32`` (float32: products in float32,
        CG recurrences in float64 for ``target="ggn"``).
    reason : str
        One sentence for ``la.last_diagnostics.choice``.
    """
    if device_type in _NO_FLOAT64:
        return (
            torch.float32,
            f"compute_dtype auto: float32 ({device_type} has no float64)",
        )
    if model_dtype == torch.float64:
        return torch.float64, "compute_dtype auto: float64 (the model is float64)"
    if device_type != "cuda":
        return torch.float64, (
            f"compute_dtype auto: float64 ({device_type}: float64 products cost "
            "~2x float32's there and keep the variances exact to rounding)"
        )
    if target != "ggn":
        return torch.float64, (
            "compute_dtype auto: float64 (target='hessian' Newton refits have no "
            "float32-product / float64-recurrence path)"
        )
    if variance_rtol is None or variance_rtol < FLOAT32_CERTIFIES:
        asked = "the residual rule" if variance_rtol is None else f"{variance_rtol:g}"
        return torch.float64, (
            f"compute_dtype auto: float64 products (the variance tolerance, "
            f"{asked}, is below what float32 products certify, "
            f"{FLOAT32_CERTIFIES:g})"
        )
    return torch.float32, (
        "compute_dtype auto: float32 products with float64 CG recurrences "
        f"(CUDA; variance tolerance {variance_rtol:g} >= {FLOAT32_CERTIFIES:g}; "
        "TF32 as torch's flag sets it)"
    )
