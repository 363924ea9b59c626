"""``log det(h G + diag(p_0))`` for any prior from one sketch of ``G`` per fit.

The data curvature ``G`` (positive semi-definite: the GGN) does not change when
the prior precision ``p_0`` or ``h`` (``_H_factor``) do. A rank-``k`` Nyström
sketch ``G_k = U diag(lam) U^T <= G``
(:func:`laplace_hfl.engine.preconditioner.sketch_products`: ``k`` products in
batched passes, once per fit) splits ``G = G_k + E`` with ``E`` positive
semi-definite, and with ``D = diag(p_0)``, ``S = U diag(h lam)^{1/2}``::

    log det(h G_k + D) = sum_i log p_0,i + log det(I_r + S^T D^{-1} S)

(matrix determinant lemma; ``r x r`` work per prior value, a plain torch
expression differentiable in ``h`` and ``p_0``). For the remainder, with
``X = (h G_k + D)^{-1/2} h E (h G_k + D)^{-1/2}`` positive semi-definite,
``log det(h G + D) - log det(h G_k + D) = log det(I + X)`` and::

    0 <= log det(I + X) <= tr X = tr((h G_k + D)^{-1} h E)

(``log(1 + x) <= x``). ``tr X`` is estimated by Hutchinson's estimator on
``m`` Rademacher probes ``z``: ``E z = G z - G_k z`` is formed once per fit
(one batched pass) and ``(h G_k + D)^{-1} z`` by Woodbury for each prior
(``m r P`` work; ``n_groups r m`` for a per-group prior). The estimate returned
is the upper end, ``log det(h G_k + D) + tr X`` (first order in ``E``: accurate
where the remainder's eigenvalues are small against the prior, i.e. where the
sketch holds every direction with ``h lam > p_0``), with the standard error of
the probe average and the width of the interval (``truncation``): the exact
value lies in ``[value - truncation, value]`` up to that standard error. A
truncation above a few nats says the rank is too small.

**Exact case.** Where ``G`` has rank below ``k`` the sketch resolves all of it
(its core matrix is rank-deficient and the sketch keeps fewer than ``k``
directions): ``E = 0`` to rounding, no probes are drawn and the result is exact;
also when ``k >= P``. Where the dense ``G`` is held, :func:`eigen_sketch` is its
eigendecomposition (exact, one ``eigh`` per fit).

**Groups.** For a layer-wise prior (constant on contiguous groups of
parameters), ``S^T D^{-1} S = sum_g S_g^T S_g / p_g`` from per-group Gram
matrices formed once: ``n_groups r^2`` work per value instead of ``P r^2``
(a scalar prior is one group).
See ``docs/marglik.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from laplace_hfl.engine.preconditioner import resolved, sketch_products
from laplace_hfl.engine.slq import make_probes

__all__ = [
    "CurvatureSketch",
    "SketchLogDet",
    "curvature_sketch",
    "eigen_sketch",
    "sketch_logdet",
]


@dataclass
class CurvatureSketch:
    """``G ~= U diag(lam) U^T`` plus probes of the remainder ``E``.

    Attributes
    ----------
    U : Tensor
        Orthonormal ``(P, r)``.
    lam : Tensor
        ``(r,)``, non-negative.
    rank : int
        The sketch size ``k`` asked for (``r <= k``).
    Z, EZ : Tensor or None
        Probes ``(m, P)`` and the remainder applied to them; None where the
        sketch is exact.
    products : int
        Curvature-vector products the sketch cost.
    probe_scale : float
        ``scale * sum_j z_j z_j^T ~= I`` of the probes (:class:`Probes`).
    """

    U: Tensor
    lam: Tensor
    rank: int
    Z: Tensor | None
    EZ: Tensor | None
    products: int
    probe_scale: float = 1.0
    _groups: dict = field(default_factory=dict, repr=False)

    @property
    def exact(self) -> bool:
        """Whether the sketch holds all of ``G`` (remainder zero to rounding)."""
        return self.Z is None

    def group_terms(self, numels: tuple[int, ...]) -> tuple[Tensor, ...]:
        """Per-group ``U_g^T U_g`` ``(n, r, r)`` and, with probes,
        ``U_g^T Z_g^T``, ``U_g^T (E Z)_g^T`` ``(n, r, m)`` and
        ``z_g . (E z)_g`` ``(n, m)`` for contiguous groups of ``numels``
        parameters (formed once per grouping)."""
        key = tuple(int(n) for n in numels)
        if key not in self._groups:
            split = list(key)
            Us = torch.split(self.U, split)
            terms: tuple[Tensor, ...] = (torch.stack([u.T @ u for u in Us]),)
            if self.Z is not None:
                Zs = torch.split(self.Z, split, -1)
                EZs = torch.split(self.EZ, split, -1)
                terms += (
                    torch.stack([u.T @ z.T for u, z in zip(Us, Zs)]),
                    torch.stack([u.T @ e.T for u, e in zip(Us, EZs)]),
                    torch.stack([(z * e).sum(-1) for z, e in zip(Zs, EZs)]),
                )
            self._groups[key] = terms
        return self._groups[key]


def curvature_sketch(
    products: Callable[[Tensor], Tensor],
    like: Tensor,
    rank: int,
    n_probes: int,
    seed: int = 0,
    chunk_size: int = 64,
) -> CurvatureSketch:
    """Sketch ``G`` (positive semi-definite, known by row-wise products).

    Parameters
    ----------
    products : callable
        ``V -> V G`` for rows ``(m, P)``.
    like : Tensor
        ``(P,)``: dimension, dtype and device.
    rank : int
        Sketch size ``k`` (``min(k, P)`` products, ``chunk_size`` at a time).
    n_probes : int
        Rademacher probes of the remainder (``chunk_size`` at a time; skipped
        where the sketch is exact).
    seed : int, default=0
    chunk_size : int, default=64

    Returns
    -------
    CurvatureSketch
    """
    P = like.numel()
    k = max(1, min(int(rank), P))
    sk = sketch_products(products, like, k, chunk_size, seed)
    U, lam = sk.U, sk.lam
    if k >= P or lam.numel() < k:
        return CurvatureSketch(U, lam, k, None, None, k)
    probes = make_probes(P, n_probes, seed + 1, like.dtype, like.device)
    Z = probes.Z
    step = max(1, chunk_size)
    GZ = torch.cat([products(Z[i : i + step]) for i in range(0, len(Z), step)])
    EZ = GZ - ((Z @ U) * lam) @ U.T
    return CurvatureSketch(U, lam, k, Z, EZ, k + len(Z), probes.scale)


def eigen_sketch(curvature: Tensor) -> CurvatureSketch:
    """The exact "sketch" of a dense ``G``: its eigenvectors with the
    eigenvalues resolved in the working precision (those below ``P eps``
    times the largest are dropped, as the Nyström sketch drops them).

    One ``eigh`` per fit; every prior value then costs ``r x r`` work
    (``n_groups r^2`` or ``P r^2``) instead of a ``P x P`` Cholesky factor.
    """
    lam, U = torch.linalg.eigh(curvature)
    keep = resolved(lam)
    return CurvatureSketch(U[:, keep], lam[keep], curvature.shape[0], None, None, 0)


@dataclass(frozen=True)
class SketchLogDet:
    """Diagnostics of :func:`sketch_logdet`.

    Attributes
    ----------
    stderr : float
        Standard error of the remainder's probe average (0 when exact).
    truncation : float
        Width of the interval the exact value lies in (module doc): the
        remainder term ``tr((h G_k + D)^{-1} h E)``.
    """

    stderr: float
    truncation: float


def sketch_logdet(
    sketch: CurvatureSketch,
    h: Tensor,
    prior: Tensor,
    numels: tuple[int, ...] | None = None,
) -> tuple[Tensor, SketchLogDet]:
    """``log det(h G + diag(p_0))`` from the sketch, differentiable in ``h``, ``prior``.

    Parameters
    ----------
    sketch : CurvatureSketch
    h : Tensor
        0-dim ``_H_factor`` (may require grad).
    prior : Tensor
        ``(P,)`` diagonal prior precision, or with ``numels`` one value per
        contiguous group (a scalar prior: ``numels=(P,)``); may require grad.
    numels : tuple of int, optional
        Group sizes (sum ``P``) for a per-group ``prior``.

    Returns
    -------
    (Tensor, SketchLogDet)
        0-dim value, and its diagnostics.
    """
    U = sketch.U
    P, r = U.shape
    h = h.to(U.dtype)
    prior = prior.to(U.dtype).reshape(-1)
    inv = 1.0 / prior
    if numels is not None:
        terms = sketch.group_terms(numels)
        sizes = torch.as_tensor(numels, dtype=U.dtype, device=U.device)
        log_d = (sizes * prior.log()).sum()
        core = torch.einsum("g,gij->ij", inv, terms[0])
    else:
        log_d = prior.log().sum()
        core = U.T @ (U * inv[:, None])
    root = (h * sketch.lam.to(U.dtype)).clamp_min(0).sqrt()
    eye = torch.eye(r, dtype=U.dtype, device=U.device)
    L = torch.linalg.cholesky(eye + root[:, None] * core * root)
    value = log_d + 2 * L.diagonal().log().sum()
    if sketch.exact:
        return value, SketchLogDet(0.0, 0.0)
    # z^T (h G_k + D)^{-1} h E z by Woodbury: D^{-1} - D^{-1} S K^{-1} S^T D^{-1}
    if numels is not None:
        _, UZ, UEZ, zEz = terms
        a = inv @ zEz
        b = torch.einsum("g,grm->mr", inv, UZ) * root
        c = torch.einsum("g,grm->mr", inv, UEZ) * root
    else:
        Zd, EZ = sketch.Z * inv, sketch.EZ
        a = (Zd * EZ).sum(-1)
        b = (Zd @ U) * root
        c = ((EZ * inv) @ U) * root
    per_probe = h * (a - (b * torch.cholesky_solve(c.T, L).T).sum(-1))
    m = per_probe.numel()
    correction = sketch.probe_scale * per_probe.sum()
    basis = sketch.probe_scale == 1.0
    stderr = 0.0 if basis or m < 2 else float(per_probe.detach().std() / m**0.5)
    return value + correction, SketchLogDet(stderr, float(correction.detach()))
