"""The weight-space posterior of the HFL shell: precision, samples, density.

``N(theta_MAP, P^{-1})`` with ``P = _H_factor * H + diag(p_0)`` as in
laplace-torch's ``FullLaplace``, but never formed: ``posterior_precision``,
``posterior_covariance`` and ``H`` are matrix-free
:class:`~laplace_hfl.engine.operators.SymmetricOperator` objects, and ``sample``
draws exactly: from the dense solver's Cholesky factor where one is used
(small ``P``, the GGN), else sample-then-optimise for the GGN and Lanczos
``P^{-1/2} z`` for the exact Hessian. The math lives in
:mod:`laplace_hfl.engine.weight_posterior`; this mixin only wires it to the estimator.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from laplace_hfl.engine.batches import eval_mode
from laplace_hfl.engine.chunks import sample_chunk
from laplace_hfl.engine.logdet import precision_quadratic
from laplace_hfl.engine.operators import SymmetricOperator
from laplace_hfl.engine.solvers import NegativeCurvature
from laplace_hfl.engine.validation import check_fits_in_memory
from laplace_hfl.engine.weight_posterior import (
    curvature_matvec,
    precision_matvec,
    solve_precision,
    weight_samples,
)
from laplace_hfl.errors import IndefiniteHessianError

__all__ = ["WeightSpaceMixin"]

_NO_WEIGHT_SPACE = (
    "HFL gives the linearised (GLM) predictive without a weight-space posterior. "
    "Use la(x, pred_type='glm'), la.functional_samples(x) or "
    "la.predictive_samples(x) (both pred_type='glm')."
)


def _indefinite(what: str, err: NegativeCurvature) -> IndefiniteHessianError:
    return IndefiniteHessianError(
        f"{what}: the posterior precision (target='hessian') has non-positive "
        f"curvature {err.curvature:.3e}, so N(theta_MAP, P^-1) does not exist. "
        "Use target='ggn' (positive definite by construction) or train the MAP "
        "to a minimum of the Laplace objective."
    )


def dense_draws(L: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` draws of ``N(0, A^{-1})`` from the lower Cholesky factor ``L`` of
    ``A = L L^T``: rows ``z^T L^{-1}`` (``z ~ N(0, I)``), whose covariance is
    ``L^{-T} L^{-1} = A^{-1}`` exactly; one triangular solve, ``n P^2``.

    Returns
    -------
    Tensor
        ``(n, P)`` in ``L``'s dtype and device.
    """
    Z = torch.randn(n, L.shape[0], dtype=L.dtype, device=L.device, generator=generator)
    return torch.linalg.solve_triangular(L, Z, upper=False, left=False)


def _rng_state(generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The state of ``generator``, or of the default generator of ``device``."""
    if generator is not None:
        return generator.get_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(
    generator: torch.Generator | None, device: torch.device, state: Tensor
) -> None:
    if generator is not None:
        generator.set_state(state)
    elif device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def check_n_samples(n_samples: object) -> int:
    """``n_samples`` as a positive ``int``.

    Raises
    ------
    TypeError
        Not an integer (``bool`` included).
    ValueError
        Not positive.
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral):
        raise TypeError(f"n_samples must be a positive integer, got {n_samples!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples}.")
    return int(n_samples)


class WeightSpaceMixin:
    """``posterior_precision``/``covariance``, ``H``, ``sample``, ``log_prob``.

    Relies on the core of :class:`laplace_hfl.base.HFLMixin` (``_objective``,
    ``_precond``, ``_check_H_init``, ``hfl_settings``).
    """

    # ----------------------------------------------------------- operators
    def _operator(
        self, name: str, rows: Callable[[Tensor], Tensor], logdet=None
    ) -> SymmetricOperator:
        model = self.model

        def matvec(V: Tensor) -> Tensor:
            with eval_mode(model):
                return rows(V)

        return SymmetricOperator(
            matvec,
            size=int(self.mean.numel()),
            dtype=self._dtype,
            device=self._device,
            compute_dtype=self.compute_dtype,
            name=name,
            chunk_size=self.chunk_size,
            logdet=logdet,
        )

    def _precision_logdet(self) -> Callable[[], tuple] | None:
        """``posterior_precision.logdet()``: :attr:`log_det_posterior_precision`
        (the marginal likelihood's value) while the hyperparameters and the fit
        are those the operator was created with; the operator's own
        computation from products after they change (None)."""
        key, H = self._hyper_key(), self.H

        def logdet() -> tuple:
            if self._hyper_key() != key or self.H is not H:
                return None
            with torch.no_grad():
                value = self.log_det_posterior_precision
            return value, self.last_logdet

        return logdet

    def _zero_curvature_operator(self) -> SymmetricOperator | None:
        """``la.H`` before a fit: the zero matrix (no data seen yet)."""
        n = getattr(self, "n_params", None)
        if n is None:
            return None
        return SymmetricOperator(
            torch.zeros_like,
            size=int(n),
            dtype=self._dtype,
            device=self._device,
            compute_dtype=getattr(self, "compute_dtype", torch.float64),
            name="H",
        )

    def _curvature_operator(self) -> SymmetricOperator:
        """``la.H``: the data curvature (what ``FullLaplace.H`` holds).

        It applies the curvature of the training batches held when it is
        created (a later ``fit(..., override=False)`` makes a new ``la.H``;
        this one, or its ``clone()``, keeps the earlier data).
        """
        obj, target = self._held_objective(), self.hfl_settings.target
        return self._operator("H", lambda V: curvature_matvec(obj, target, V))

    def _held_objective(self):
        """The objective over the training batches held now (not those of a
        later online fit), so that operators and their clones keep their data."""
        obj, held = self._objective(), self._training_data
        if held is None:
            return obj
        return dataclasses.replace(obj, batches=lambda: iter(held))

    @property
    def posterior_precision(self) -> SymmetricOperator:
        """``P = _H_factor * H + diag(p_0)`` as a matrix-free operator.

        Supports ``P @ v`` for ``(P,)`` and ``(P, k)`` operands (batched
        GGN- or Hessian-vector products), ``.shape``, ``.dtype``, ``.device``;
        ``.to_dense()`` builds the matrix. Reflects the hyperparameters at
        the time of access, like laplace-torch's dense property.

        Raises
        ------
        HFLNotFittedError
            Before ``fit``.
        """
        self._check_H_init()
        obj, target = self._held_objective(), self.hfl_settings.target
        return self._operator(
            "posterior_precision",
            lambda V: precision_matvec(obj, target, V),
            self._precision_logdet(),
        )

    @property
    def posterior_covariance(self) -> SymmetricOperator:
        """``P^{-1}`` as a matrix-free operator: ``@`` solves by batched CG.

        Each product runs preconditioned CG to the ``rtol``/``max_iter``
        options and warns (``RefitConvergenceWarning``) when a solve stops
        early. ``.to_dense()`` solves ``P`` systems.

        Raises
        ------
        HFLNotFittedError
            Before ``fit``.
        IndefiniteHessianError
            (on use) ``target="hessian"`` and ``P`` is not positive definite.
        """
        self._check_H_init()
        obj, s = self._objective(), self.hfl_settings

        def solve(V: Tensor) -> Tensor:
            try:
                return solve_precision(
                    obj, s.target, V, s.rtol, s.max_iter, self._precond(obj)
                )
            except NegativeCurvature as err:
                raise _indefinite("posterior_covariance", err) from err

        return self._operator("posterior_covariance", solve)

    @property
    def posterior_variance(self) -> Tensor:
        """Not available: ``diag(P^{-1})`` needs ``P`` solves (as in FullLaplace,
        which has no such property either)."""
        raise AttributeError(
            "HFL has no posterior_variance (FullLaplace has none either): the "
            "diagonal of P^-1 takes P solves. Use "
            "la.posterior_covariance.to_dense().diagonal() (P CG solves), "
            "la.sample(n).var(0) (Monte Carlo) or la.functional_variance(Js)."
        )

    @property
    def posterior_scale(self) -> Tensor:
        """Not available: no square root of ``P^{-1}`` is formed."""
        raise AttributeError(
            "HFL forms no posterior_scale (P^-1/2). Draw weights with "
            "la.sample(n), or use la.posterior_covariance (matrix-free P^-1) "
            "and .to_dense() where a dense matrix fits in memory."
        )

    # -------------------------------------------------------------- samples
    def _check_generator(self, generator: torch.Generator | None) -> None:
        if generator is not None and (
            not isinstance(generator, torch.Generator)
            or generator.device != self._device
        ):
            raise ValueError(
                "Invalid random generator (check type and device): pass a "
                f"torch.Generator on {self._device}, got {generator!r}."
            )

    def _weight_draws(
        self, n_samples: int, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """MAP and ``(S, P)`` posterior weight draws, in the compute dtype.

        Draws are a deterministic function of the fit, the hyperparameters,
        ``n_samples``, ``chunk_size`` and the generator's state: a call that
        finds the same ones returns the stored draws and leaves the generator
        where drawing them left it (:func:`draw_cache_key`), so repeated
        ``pred_type="nn"`` calls with a seeded generator solve nothing.
        """
        self._check_H_init()
        n = check_n_samples(n_samples)
        check_fits_in_memory(
            n * self.n_params, self.compute_dtype, self._device,
            f"{n} weight samples of {self.n_params} parameters",
        )  # fmt: skip
        self._check_generator(generator)
        with eval_mode(self.model):
            obj = self._objective()
            key = (
                self._hyper_key(),
                n,
                self.chunk_size,
                self._uses_dense(obj.theta_map.numel()),
            )
            state_in = _rng_state(generator, self._device)
            cached = getattr(self, "_draw_cache", None)
            if (
                cached is not None
                and cached[0] is self.mean  # the same fit (a fit sets a new mean)
                and cached[1] == key
                and torch.equal(cached[2], state_in)
            ):
                _set_rng_state(generator, self._device, cached[3])
                return obj.theta_map, obj.theta_map + cached[4]
            deviations = self._fresh_deviations(obj, n, generator)
        self._draw_cache = (
            self.mean,
            key,
            state_in,
            _rng_state(generator, self._device),
            deviations,
        )
        return obj.theta_map, obj.theta_map + deviations

    def _fresh_deviations(
        self, obj, n: int, generator: torch.Generator | None
    ) -> Tensor:
        """``(n, P)`` draws of ``N(0, P^{-1})``: from the dense solver's
        Cholesky factor where it is used on a curvature taken at the MAP (its
        matrix is then the posterior precision), else matrix-free."""
        curvature = self.hfl_settings.curvature
        if not curvature.at_base_point and self._uses_dense(obj.theta_map.numel()):
            return dense_draws(self._draw_factor(obj), n, generator)
        try:
            draws = weight_samples(
                obj,
                n,
                target=curvature,
                generator=generator,
                rtol=self.hfl_settings.rtol,
                max_iter=self.hfl_settings.max_iter,
                chunk_size=sample_chunk(self.chunk_size),
                precond=self._precond(obj) if curvature.gauss_newton else None,
            )
        except NegativeCurvature as err:
            raise _indefinite("sample()", err) from err
        return draws.deviations

    def _draw_factor(self, obj) -> Tensor:
        """Lower Cholesky factor of the dense solver's ``A`` (the one its
        factor was formed with, once per fit and hyperparameters)."""
        return self._dense(obj).L

    def sample(
        self, n_samples: int = 100, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact draws of ``N(theta_MAP, P^{-1})``.

        Where the dense solver is used (``solver="dense"``, or ``"auto"`` for
        small ``P``) and ``target="ggn"``, from the Cholesky factor of its
        matrix, which is ``P`` itself: one triangular solve per call after the
        factor is formed (once per fit and hyperparameters), as in
        laplace-torch's ``FullLaplace``. Otherwise without forming ``P``:
        ``target="ggn"``: sample-then-optimise; each draw solves
        ``P delta = b`` with a random right-hand side of covariance ``P``
        (batched, preconditioned CG to ``rtol``), so ``theta_MAP + delta`` has
        covariance ``P^{-1}`` exactly up to the CG tolerance.
        ``target="hessian"`` (no square-root factorisation of ``P``):
        ``delta = P^{-1/2} z`` by batched Lanczos. Costs solver iterations x
        passes over the training data, for ``chunk_size`` draws at a time.
        A call with the same fit, hyperparameters, ``n_samples``,
        ``chunk_size`` and generator state as the previous one returns the
        same draws without solving again (and leaves the generator where
        drawing them did).

        Parameters
        ----------
        n_samples : int, default=100
        generator : torch.Generator, optional
            On the model's device; the same generator state gives the same
            draws (the global generator when None).

        Returns
        -------
        Tensor
            ``(n_samples, P)`` in the model's dtype.

        Raises
        ------
        HFLNotFittedError
            Before ``fit``.
        TypeError, ValueError
            ``n_samples`` not a positive integer; invalid ``generator``.
        IndefiniteHessianError
            ``target="hessian"`` and ``P`` is not positive definite.

        Warns
        -----
        RefitConvergenceWarning
            A draw's CG solve stopped at ``max_iter`` above ``rtol``.
        """
        return self._weight_draws(n_samples, generator)[1].to(self._dtype)

    # -------------------------------------------------------------- density
    def square_norm(self, value: Tensor) -> Tensor:
        """``(value - theta_MAP)^T P (value - theta_MAP)``, one curvature product.

        Raises
        ------
        HFLNotFittedError, ValueError
            As :meth:`log_prob`.
        """
        return -2 * self.log_prob(value, normalized=False)

    def log_prob(self, value: Tensor, normalized: bool = True) -> Tensor:
        """Log density of the Laplace posterior ``N(theta_MAP, P^-1)`` at ``value``.

        The quadratic form ``(v - theta)^T P (v - theta)`` takes one batched
        curvature-vector product; the normaliser uses
        :attr:`log_det_posterior_precision` (stochastic Lanczos quadrature,
        exact for small models).

        Parameters
        ----------
        value : Tensor
            Weights ``(P,)`` or a batch ``(n, P)``.
        normalized : bool, default=True
            Include ``-P/2 log(2 pi) + 1/2 log det P``.

        Returns
        -------
        Tensor
            Scalar for ``(P,)``, ``(n,)`` for a batch.

        Raises
        ------
        HFLNotFittedError
            Not fitted (or no training data).
        ValueError
            ``value`` is not of shape ``(P,)`` or ``(n, P)``, or not finite.
        """
        self._check_H_init()
        value = torch.as_tensor(value)
        if value.ndim not in (1, 2) or value.shape[-1] != self.n_params:
            raise ValueError(
                f"log_prob needs weights of shape ({self.n_params},) or "
                f"(n, {self.n_params}); got {tuple(value.shape)}."
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError("log_prob got non-finite weights (NaN/inf).")
        dtype = self.compute_dtype
        delta = (value.detach().to(self._device, dtype) - self.mean.to(dtype)).reshape(
            -1, self.n_params
        )
        with eval_mode(self.model):
            obj = self._objective()
            quad = precision_quadratic(obj, self.hfl_settings.target, delta)
        quad = quad.to(self._dtype).reshape(value.shape[:-1])
        if not normalized:
            return -quad / 2
        const = -self.n_params / 2 * math.log(2 * math.pi)
        return const + self.log_det_posterior_precision / 2 - quad / 2
