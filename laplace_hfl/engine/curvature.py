"""Curvature objects: what the refits' curvature is, GGN or exact Hessian.

The public option ``target="ggn" | "hessian"`` names one of :data:`CURVATURES`;
:attr:`laplace_hfl.engine.refit.RefitSettings.curvature` maps it to the object.
Each object says how its refits behave where the two differ:

:class:`GGN` (``"ggn"``)
    the Gauss-Newton model of the Laplace objective at the MAP. The refit is
    quadratic (:attr:`Curvature.gauss_newton`): one CG solve per direction, the
    central difference is exact, CG's variance brackets are certified. The data
    curvature is the one at the MAP for every hyperparameter value, so its dense
    form is built once per fit and predictions take their Jacobians at the MAP.
:class:`ExactHessian` (``"hessian"``)
    the network itself, refit by Newton-CG. Its curvature is taken where the
    unperturbed refit ends (:attr:`Curvature.at_base_point`; the MAP when it is
    stationary): the dense Hessian is formed there, once per hyperparameter
    value, and predictions take their Jacobians there.

Adding a curvature: subclass :class:`Curvature` and add one entry to
:data:`CURVATURES`; ``target=<name>`` then selects it.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from laplace_hfl.engine.dense import data_ggn, data_hessian
from laplace_hfl.engine.functional import (
    LaplaceObjective,
    ggn_matvec,
    hessian_matvec,
    objective_grad,
)

__all__ = ["Curvature", "GGN", "ExactHessian", "CURVATURES", "curvature_of"]


class Curvature:
    """The curvature ``A`` of the refit objective (see module doc)."""

    #: The ``target`` option that selects it.
    name: ClassVar[str] = ""
    #: Whether the refit is the quadratic Gauss-Newton model: one CG solve per
    #: direction, exact central differences, certified variance brackets,
    #: float32 products with float64 recurrences.
    gauss_newton: ClassVar[bool] = False
    #: Whether the curvature is taken where the unperturbed refit ends (it
    #: then moves with the prior); else at the MAP for every hyperparameter.
    at_base_point: ClassVar[bool] = False

    def products(
        self, obj: LaplaceObjective, thetas: Tensor, idx: Tensor, V: Tensor
    ) -> Tensor:
        """``A(theta_i) v_i`` (data and prior) for the rows ``idx`` of
        ``thetas`` ``(m, P)`` and the rows of ``V`` ``(len(idx), P)``."""
        raise NotImplementedError

    def refit_gradient(
        self, obj: LaplaceObjective, theta0: Tensor, residual0: Tensor, thetas: Tensor
    ) -> Tensor:
        """Gradient of the unperturbed refit objective at each row of
        ``thetas``, given its value ``residual0`` at the base point ``theta0``."""
        raise NotImplementedError

    def precision_matvec(self, obj: LaplaceObjective, V: Tensor) -> Tensor:
        """``P v`` at the MAP for each row of ``V`` ``(m, P)``."""
        thetas = obj.theta_map.expand(V.shape[0], -1).clone()
        return self.products(obj, thetas, slice(None), V)

    def dense_data(
        self,
        obj: LaplaceObjective,
        theta: Tensor,
        chunk_size: int = 64,
        progress_bar: bool = False,
    ) -> Tensor:
        """The data curvature at ``theta`` as a ``(P, P)`` matrix (no prior,
        no ``h``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GGN(Curvature):
    """GGN + prior: the Gauss-Newton model at the MAP (``target="ggn"``)."""

    name = "ggn"
    gauss_newton = True
    at_base_point = False

    def products(self, obj, thetas, idx, V):
        return ggn_matvec(obj, V)

    def refit_gradient(self, obj, theta0, residual0, thetas):
        return residual0 + ggn_matvec(obj, thetas - theta0)

    def dense_data(self, obj, theta, chunk_size=64, progress_bar=False):
        return data_ggn(obj, progress_bar=progress_bar)


class ExactHessian(Curvature):
    """The exact Hessian of the Laplace objective (``target="hessian"``)."""

    name = "hessian"
    gauss_newton = False
    at_base_point = True

    def products(self, obj, thetas, idx, V):
        return hessian_matvec(obj, thetas[idx], V)

    def refit_gradient(self, obj, theta0, residual0, thetas):
        return objective_grad(obj, thetas)

    def dense_data(self, obj, theta, chunk_size=64, progress_bar=False):
        return data_hessian(obj, theta, chunk_size, progress_bar)


#: ``target`` name -> curvature object.
CURVATURES: dict[str, Curvature] = {"ggn": GGN(), "hessian": ExactHessian()}


def curvature_of(target: str | Curvature) -> Curvature:
    """The curvature object of a ``target`` name (objects pass through)."""
    return target if isinstance(target, Curvature) else CURVATURES[target]
