"""Solver objects: how the refit systems ``A u = v`` are solved, each with its cache.

A :class:`Solver` answers ``A^{-1} v`` for the rows of ``V``
(:meth:`Solver.solve`, returning the answers and their diagnostics) and keeps
what it can reuse across calls in one cache, keyed on the hyperparameter key
the estimator passes in its :class:`SolveContext` (prior precision and mean,
``sigma_noise``, temperature, settings): the cache is rebuilt exactly when that
key changes (:meth:`Solver.cached`). What does not depend on the
hyperparameters (the dense data GGN) lives as long as the object, i.e. one fit.

:data:`SOLVERS` maps names to classes:

``"dense"`` (:class:`DenseCholesky`)
    one Cholesky factor of ``h C + diag(p_0)`` per key (:mod:`laplace_hfl.engine.dense`).
``"cg"`` (:class:`CGRefits`)
    perturbed refits by preconditioned CG from the unperturbed refit's end
    point, its base point, cached per key (:mod:`laplace_hfl.engine.refit`).
``"minibatch"`` (:class:`MinibatchRefits`)
    averaged minibatch refits (:mod:`laplace_hfl.engine.stochastic`); chosen by
    ``minibatch_epochs``, not by ``solver=`` (:attr:`Solver.selectable`).
``"amortized"`` (:class:`AmortizedSampling`)
    ``S`` posterior samples drawn once per key, every answer read from them
    (:mod:`laplace_hfl.engine.amortized`); chosen by ``amortize``.

Adding a solver: one subclass of :class:`Solver` (``name``, ``solve``) and one
entry in :data:`SOLVERS`; ``solver="<name>"`` then selects it (the options
read the registry through :func:`solver_names`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from laplace_hfl.engine.amortized import (
    AmortizedState,
    amortized_covariance,
    amortized_solve,
    posterior_samples,
    sample_rtol,
    sgd_posterior_samples,
)
from laplace_hfl.engine.chunks import (
    hessian_rows,
    query_points,
    sample_chunk,
    sketch_columns,
)
from laplace_hfl.engine.curvature import Curvature
from laplace_hfl.engine.deflated_samples import deflated_factor, deflation_products
from laplace_hfl.engine.dense import (
    DenseFactor,
    factorize,
    linear_layer_order,
    query_rows,
)
from laplace_hfl.engine.functional import LaplaceObjective, objective_grad
from laplace_hfl.engine.krylov_reuse import (
    RECYCLE_RCOND,
    RecycledSpace,
    recycle_capacity,
)
from laplace_hfl.engine.precond_objects import NoPreconditioner, PreconditionerMethod
from laplace_hfl.engine.preconditioner import nystrom_sketch
from laplace_hfl.engine.refit import (
    BasePoint,
    RefitDiagnostics,
    RefitSettings,
    perturbed_refits,
    unperturbed_refit,
)
from laplace_hfl.engine.stochastic import MINIBATCH_RTOL, minibatch_refits
from laplace_hfl.errors import HFLNotFittedError

__all__ = [
    "SolveContext",
    "Solver",
    "DenseCholesky",
    "CGRefits",
    "MinibatchRefits",
    "AmortizedSampling",
    "SOLVERS",
    "solver_names",
    "dense_base_point",
]


def _no_preconditioner(obj: LaplaceObjective) -> PreconditionerMethod:
    return NoPreconditioner()


@dataclass(frozen=True)
class SolveContext:
    """What a solve reads from the estimator, built by it for each call.

    Attributes
    ----------
    key : hashable
        The hyperparameter key: caches are rebuilt exactly when it changes.
    settings : RefitSettings
        Tolerances and the curvature (:attr:`curvature`).
    chunk_size : int
        Directions refit together (CG), Hessian rows per pass (dense).
    progress_bar : bool
    preconditioner : callable
        ``preconditioner(obj)``: the chosen preconditioner object, built
        (:mod:`laplace_hfl.engine.precond_objects`); it knows its name.
    choice : callable
        Why this solver and preconditioner (``last_diagnostics.choice``).
    n_data : int
        Training points ``N`` (minibatch refits).
    batch_rows : int or None
        Rows of a minibatch (the training loader's ``batch_size``).
    epochs : int or None
        ``minibatch_epochs``.
    n_samples : int or None
        ``amortize``: posterior samples drawn.
    noise : callable
        Per-example noise of the sample-then-optimise draws (amortised).
    has_data : bool
        Whether the estimator holds training data (a loaded state may not).
    deflation : int
        ``amortize_deflation``: top directions of the Nyström sketch handled
        exactly by the amortised answers (0: none).
    """

    key: Hashable
    settings: RefitSettings
    chunk_size: int = 64
    progress_bar: bool = False
    preconditioner: Callable[[LaplaceObjective], PreconditionerMethod] = (
        _no_preconditioner
    )
    choice: Callable[[], str] = str
    n_data: Any = 0
    batch_rows: int | None = None
    epochs: int | None = None
    n_samples: int | None = None
    noise: Callable[[], Any] = lambda: None  # noqa: E731
    has_data: bool = True
    deflation: int = 0

    @property
    def curvature(self) -> Curvature:
        """The refits' curvature (``settings.target``)."""
        return self.settings.curvature

    def precond(self, obj: LaplaceObjective) -> tuple[str, Any]:
        """The chosen preconditioner's name and ``M^{-1}`` for ``obj``."""
        method = self.preconditioner(obj)
        return method.name, method.apply(obj.h_factor, obj.prior_precision)


class Solver:
    """Solves ``A u = v`` for rows ``v``; owns its per-key cache.

    Subclasses set :attr:`name` and implement :meth:`solve`; the other
    methods have defaults that suit a solver without one-time work.
    """

    #: The ``solver`` option (registry key) that selects it.
    name: ClassVar[str] = ""
    #: Whether ``solver="<name>"`` selects it (False: chosen by an option of
    #: its own, ``amortize`` or ``minibatch_epochs``).
    selectable: ClassVar[bool] = True

    def __init__(self) -> None:
        self._key: Hashable | None = None
        self._cache: dict[str, Any] = {}

    # ------------------------------------------------------------- the cache
    def cache_key(self, ctx: SolveContext) -> Hashable:
        """The key the cache is valid for (the context's hyperparameter key)."""
        return ctx.key

    def cached(self, ctx: SolveContext, slot: str, build: Callable[[], Any]) -> Any:
        """``slot`` of the cache, built by ``build()`` when missing; the whole
        cache is dropped first when the key changed."""
        key = self.cache_key(ctx)
        if self._key != key:
            self._cache, self._key = {}, key
        if slot not in self._cache:
            self._cache[slot] = build()
        return self._cache[slot]

    def is_current(self, ctx: SolveContext) -> bool:
        """Whether the cache holds something for ``ctx``'s key."""
        return bool(self._cache) and self._key == self.cache_key(ctx)

    def reset(self) -> None:
        """Drop the cache (the next call rebuilds it)."""
        self._key, self._cache = None, {}

    @property
    def base(self) -> BasePoint | None:
        """The cached base point, if one was formed."""
        return self._cache.get("base")

    # ----------------------------------------------------------------- calls
    def solve(
        self, obj: LaplaceObjective, V: Tensor, ctx: SolveContext
    ) -> tuple[Tensor, Any]:
        """``A^{-1} v`` for the rows of ``V`` ``(m, P)`` and the diagnostics
        (``None``: leave ``last_diagnostics`` as it is)."""
        raise NotImplementedError

    def prepare(self, obj: LaplaceObjective, ctx: SolveContext) -> None:
        """The one-time work of the solves (before a prediction loop, so that
        the first chunk's time predicts the others')."""

    def query_step(
        self, obj: LaplaceObjective, n_outputs: int, ctx: SolveContext
    ) -> int:
        """Query points per prediction chunk (after :meth:`prepare`)."""
        self.prepare(obj, ctx)
        return query_points(ctx.chunk_size, n_outputs)

    def base_point(self, obj: LaplaceObjective, ctx: SolveContext) -> BasePoint | None:
        """Where the refits start (``None``: the MAP, nothing refit)."""
        return None

    def predictive(
        self,
        objective: Callable[[], LaplaceObjective],
        Xq: Any,
        joint: bool,
        ctx: SolveContext,
    ) -> tuple[Tensor, Tensor] | None:
        """Mean and covariance at ``Xq`` without query Jacobians where the
        solver can (``None``: by Jacobians and :meth:`solve`)."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# ---------------------------------------------------------------------- dense
def dense_base_point(obj: LaplaceObjective, factor: DenseFactor) -> BasePoint:
    """Minimiser of the Gauss-Newton model at the MAP, by the dense factor:
    ``theta_MAP - A^{-1} grad L(theta_MAP)``.

    The dense counterpart of :func:`laplace_hfl.engine.refit.unperturbed_refit`;
    it records how stationary the MAP is (``map_grad_norm``).
    """
    theta0 = obj.theta_map
    g0 = objective_grad(obj, theta0[None])[0]
    delta = -factor.Sigma @ g0
    residual = g0 + factor.A @ delta
    return BasePoint(theta0 + delta, residual, float(g0.norm()), float(delta.norm()), 0)


class DenseCholesky(Solver):
    """One Cholesky factor of ``h C + diag(p_0)`` per key; every solve is one
    product with its inverse."""

    name = "dense"

    def __init__(self) -> None:
        super().__init__()
        self._data: dict[str, Tensor] = {}  # data curvature at the MAP, per fit

    def data_curvature(
        self, obj: LaplaceObjective, curvature: Curvature, progress_bar: bool = False
    ) -> Tensor:
        """The data curvature at the MAP (formed once per fit, shared with
        the marginal likelihood)."""
        if curvature.name not in self._data:
            self._data[curvature.name] = curvature.dense_data(
                obj, obj.theta_map, progress_bar=progress_bar
            )
        return self._data[curvature.name]

    def factor(
        self, ctx: SolveContext, objective: Callable[[], LaplaceObjective]
    ) -> DenseFactor:
        """The factor for ``ctx.key``; ``objective()`` is called only when it
        has to be formed."""

        def build() -> DenseFactor:
            obj = objective()
            curvature = ctx.curvature
            if curvature.at_base_point:  # depends on the prior through the base
                theta = self.base_point(obj, ctx).theta
                C = curvature.dense_data(
                    obj, theta, hessian_rows(ctx.chunk_size), ctx.progress_bar
                )
            else:
                C = self.data_curvature(obj, curvature, ctx.progress_bar)
            factor = factorize(C, obj.h_factor, obj.prior_precision, curvature.name)
            if not curvature.at_base_point:  # records how stationary the MAP is
                self._cache["base"] = dense_base_point(obj, factor)
            return factor

        return self.cached(ctx, "factor", build)

    def linear_order(
        self,
        ctx: SolveContext,
        objective: Callable[[], LaplaceObjective],
        shape: tuple[int, int, bool],
    ) -> Tensor:
        """``Sigma`` reordered for a ``Linear`` refit module of ``(out, in,
        bias)`` (:func:`~laplace_hfl.engine.dense.linear_layer_order`), per key."""
        return self.cached(
            ctx,
            "linear",
            lambda: linear_layer_order(self.factor(ctx, objective).Sigma, *shape),
        )

    def diagnostics(
        self, factor: DenseFactor, m: int, like: Tensor, ctx: SolveContext
    ) -> RefitDiagnostics:
        """What a dense solve of ``m`` directions reports."""
        residual = like.new_full((2, m), factor.residual)
        return RefitDiagnostics(
            eps=like.new_zeros(m),
            residual=residual,
            iterations=torch.zeros(2, m, dtype=torch.long, device=like.device),
            converged=residual <= ctx.settings.rtol,
            solver=self.name,
            preconditioner="none",
            choice=ctx.choice(),
        )

    def solve(self, obj, V, ctx):
        factor = self.factor(ctx, lambda: obj)
        U = factor.solve(V)
        return U, self.diagnostics(factor, V.shape[0], V, ctx)

    def query_step(self, obj, n_outputs, ctx):
        self.factor(ctx, lambda: obj)
        return query_rows(obj.theta_map.numel(), max(n_outputs, 1))

    def base_point(self, obj, ctx):
        if ctx.curvature.at_base_point:
            return self.cached(
                ctx,
                "base",
                lambda: unperturbed_refit(obj, ctx.settings, ctx.precond(obj)[1]),
            )
        self.factor(ctx, lambda: obj)
        return self._cache["base"]


# ------------------------------------------------------------------------- CG
class CGRefits(Solver):
    """Perturbed refits by preconditioned CG, from the base point (cached per
    key; its solve builds the preconditioner too).

    Opt-in reuse (off by default): with ``recycle_vectors > 0`` (e.g.
    ``CGRefits.recycle_vectors = RECYCLE_VECTORS``) and ``target="ggn"``, the
    solutions of every call are kept per key (up to ``recycle_vectors``,
    :func:`~laplace_hfl.engine.krylov_reuse.recycle_capacity`) and later
    solves start from their Galerkin projection
    (:mod:`laplace_hfl.engine.krylov_reuse`): later query chunks need fewer
    iterations, and answers then depend on what was solved before (within
    their certified brackets), not on the call alone. The cache's key drops
    them when the hyperparameters change.
    """

    name = "cg"
    #: Most earlier solutions kept for reuse (0: off, the default, so that
    #: a query's answer does not depend on earlier queries).
    recycle_vectors: int = 0

    def base_point(self, obj, ctx):
        return self.cached(
            ctx,
            "base",
            lambda: unperturbed_refit(obj, ctx.settings, ctx.precond(obj)[1]),
        )

    def prepare(self, obj, ctx):
        self.base_point(obj, ctx)

    def solve(self, obj, V, ctx):
        base = self.base_point(obj, ctx)
        name, precond = ctx.precond(obj)
        U, diag = perturbed_refits(
            obj,
            base,
            V,
            ctx.settings,
            chunk_size=ctx.chunk_size,
            progress_bar=ctx.progress_bar,
            precond=precond,
            recycle=self.recycled(obj, ctx),
        )
        return U, dataclasses.replace(diag, preconditioner=name, choice=ctx.choice())

    def recycled(self, obj: LaplaceObjective, ctx: SolveContext) -> RecycledSpace:
        """The kept solutions for ``ctx.key`` (empty at first)."""
        capacity = recycle_capacity(
            obj.theta_map.numel(), ctx.n_data, self.recycle_vectors
        )
        dtype = obj.theta_map.dtype  # of the products
        rcond = RECYCLE_RCOND.get(dtype, RECYCLE_RCOND[torch.float32])
        return self.cached(ctx, "recycle", lambda: RecycledSpace(capacity, rcond))


# ------------------------------------------------------------------ minibatch
class MinibatchRefits(Solver):
    """Averaged minibatch refits (``minibatch_epochs``); nothing cached."""

    name = "minibatch"
    selectable = False

    def solve(self, obj, V, ctx):
        res = minibatch_refits(
            obj,
            V,
            ctx.n_data,
            epochs=ctx.epochs,
            precond=ctx.precond(obj)[1],
            batch_rows=ctx.batch_rows,
            rtol=max(ctx.settings.rtol, MINIBATCH_RTOL),
        )
        return res.U, res


# ------------------------------------------------------------------ amortised
class AmortizedSampling(Solver):
    """``S = amortize`` posterior samples, drawn once per key (by full-batch
    CG, or by minibatch refits with ``minibatch_epochs``); every answer is
    read from them."""

    name = "amortized"
    selectable = False

    def cache_key(self, ctx: SolveContext) -> Hashable:
        return (ctx.key, int(ctx.n_samples))

    def samples(
        self, ctx: SolveContext, objective: Callable[[], LaplaceObjective]
    ) -> AmortizedState:
        """The samples for ``ctx`` (drawn when the key changed)."""

        def build() -> AmortizedState:
            if not ctx.has_data:
                raise HFLNotFittedError(
                    "The stored amortised samples belong to other hyperparameters "
                    "(prior precision, sigma_noise, temperature or settings changed "
                    "since they were drawn) and this estimator has no training data "
                    "to redraw them: call la.fit(train_loader) again."
                )
            obj = objective()
            S = int(ctx.n_samples)
            noise = ctx.noise()
            if ctx.epochs is not None:
                return sgd_posterior_samples(
                    obj,
                    S,
                    ctx.epochs,
                    batch_rows=ctx.batch_rows,
                    chunk_size=sample_chunk(ctx.chunk_size),
                    precond=ctx.precond(obj)[1],
                    rtol=max(ctx.settings.rtol, MINIBATCH_RTOL),
                    noise=noise,
                )
            return posterior_samples(
                obj,
                S,
                rtol=sample_rtol(S, ctx.settings.rtol),
                max_iter=ctx.settings.max_iter,
                chunk_size=sample_chunk(ctx.chunk_size),
                precond=ctx.precond(obj)[1],
                noise=noise,
            )

        return self.cached(ctx, "samples", build)

    def stored(self) -> tuple[AmortizedState, Hashable] | None:
        """The samples held and the hyperparameter key they were drawn for."""
        state = self._cache.get("samples")
        return None if state is None else (state, self._key[0])

    def restore(self, state: AmortizedState, key: Hashable, n_samples: int) -> None:
        """Hold ``state`` as the samples drawn for ``key`` (a loaded state)."""
        self._key, self._cache = (key, int(n_samples)), {"samples": state}

    def rows(self, ctx: SolveContext, obj: LaplaceObjective) -> Tensor:
        """Rows ``F`` whose ``F^T F / len(F)`` is the covariance estimate: the
        samples, or with ``ctx.deflation = k > 0`` the samples projected off
        the top-``k`` directions of the Nyström sketch plus those directions
        handled exactly (:mod:`laplace_hfl.engine.deflated_samples`; ``A W``
        is recomputed from the training data once per key, not stored)."""
        samples = self.samples(ctx, lambda: obj).samples
        k = int(ctx.deflation)
        if k <= 0:
            return samples

        def build() -> Tensor:
            if not ctx.has_data:
                raise HFLNotFittedError(
                    f"amortize_deflation={k} recomputes k GGN products from the "
                    "training data, which this estimator (a loaded state) does "
                    "not hold: call la.fit(train_loader) again, or construct it "
                    "with amortize_deflation=None to predict from the stored "
                    "samples alone."
                )
            # the preconditioner's sketch when asked at rank >= k (it may keep
            # fewer columns: directions the GGN does not resolve, not deflated)
            method = ctx.preconditioner(obj)
            sketch = getattr(method, "sketch", None)
            if sketch is None or (getattr(method, "rank", None) or 0) < k:
                sketch = nystrom_sketch(
                    obj, k, chunk_size=sketch_columns(ctx.chunk_size)
                )
            W = sketch.U[:, :k].T.contiguous()  # lam descending: the top k
            AW = deflation_products(obj, W, sample_chunk(ctx.chunk_size))
            return deflated_factor(samples, W, AW)

        return self.cached(ctx, f"deflated{k}", build)

    def solve(self, obj, V, ctx):
        return amortized_solve(self.rows(ctx, obj), V), None

    def predictive(self, objective, Xq, joint, ctx):
        obj = objective()
        return amortized_covariance(
            obj.forward,
            obj.theta_map,
            Xq,
            self.rows(ctx, obj),
            joint=joint,
            chunk_size=sample_chunk(ctx.chunk_size),
        )


#: Solver name -> class. ``solver="<name>"`` selects the selectable ones.
SOLVERS: dict[str, type[Solver]] = {
    "dense": DenseCholesky,
    "cg": CGRefits,
    "minibatch": MinibatchRefits,
    "amortized": AmortizedSampling,
}


def solver_names() -> tuple[str, ...]:
    """Names ``solver=`` accepts besides ``"auto"`` (read at each call, so
    that a solver registered later is accepted)."""
    return tuple(name for name, cls in SOLVERS.items() if cls.selectable)
