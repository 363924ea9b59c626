"""Shared numpydoc text of the HFL classes: ``enable_backprop``, the
keyword-only options (:class:`laplace_hfl.options.HFLOptions`, in its order)
and what the constructors raise."""

HFL_OPTIONS_DOC = """
    enable_backprop : bool, default=False
        Make the GLM predictive differentiable w.r.t. the inputs (e.g. for
        Bayesian optimisation): refit displacements are constants of autograd
        and the Jacobians carry the gradient (exact for symmetric ``P^{-1}``).
    eps : float, default=1e-3
        Relative perturbation size (keyword-only). Each direction ``v`` is
        perturbed by ``eps / sqrt(v^T A^{-1} v)`` on the summed objective (``A``
        the refit's curvature, from its first Newton step), so a refit moves the
        perturbed output by ``eps`` posterior standard deviations; ``eps`` is
        shrunk automatically if a network refit meets negative curvature.
        ``target="ggn"`` is exact for any ``eps``; ``"hessian"`` has ``O(eps^2)``
        bias (measured: 6e-4 relative at 1e-2, 6e-6 at 1e-3 on a 1-10-1 tanh net).
    target : {"ggn", "hessian"}, default="ggn"
        ``"ggn"`` refits the linearised network (Gauss-Newton model at the MAP):
        converges to ``FullLaplace`` with a GGN backend, at any MAP.
        ``"hessian"`` refits the network itself (the paper's form): converges to
        exact-Hessian Laplace, needs a MAP at a minimum of the Laplace objective.
    rtol : float, default=1e-6
        Refit tolerance: residual gradient norm at most ``rtol * eps_j * ||J||``.
    max_iter : int, default=1000
        Conjugate-gradient iterations per linear solve.
    max_newton : int, default=20
        Newton steps per network refit (``target="hessian"``).
    chunk_size : int or "auto", default="auto"
        Parameter vectors handled by one vectorised product: refit directions
        (query points x outputs) solved together, so ``chunk_size // C``
        query points per prediction chunk; likewise Hessian rows (dense
        ``target="hessian"``), Nyström sketch columns and posterior samples
        per pass (:mod:`laplace_hfl.engine.chunks`). Memory grows as
        ``chunk_size`` times the bytes of one direction (parameter vectors
        and one batch's activations). ``"auto"`` chooses it at each ``fit``
        (:mod:`laplace_hfl.engine.chunk_memory`): the most directions whose
        bytes fit half the device's free memory, measured by a probe of one
        batch on CUDA (up to 4,096), modelled elsewhere and at most 64 on the
        CPU (larger chunks are no faster there). ``la.chunk_size`` holds the
        number (64 before ``fit``), ``la.last_diagnostics.choice`` why.
        Directions are grouped differently, not solved differently: results
        change only by rounding.
    compute_dtype : torch.dtype or "auto", default="auto"
        Precision of the refits. ``torch.float64``: everything in float64
        (float32 models are refit in float64 so that their variances stay
        accurate). ``torch.float32``: the products (data passes) in float32,
        CG's recurrences, brackets and Rayleigh-Ritz step in float64
        (``target="ggn"``). ``"auto"`` (:mod:`laplace_hfl.engine.precision`):
        float64 on the CPU and for float64 models; on CUDA float32 products
        with float64 recurrences, unless the variance tolerance is below
        what float32 products certify (1e-5; ``rtol`` below its default
        selects the residual rule) or ``target="hessian"``: then float64.
        TF32 stays as torch's flags set it. ``la.compute_dtype`` holds the
        dtype chosen, ``la.last_diagnostics.choice`` why. Results are
        returned in the model's dtype.
    progress_bar : bool, default=False
        Show tqdm bars over prediction and refit chunks from the start. When
        False, a bar still appears, labelled with the expected total time,
        once the first chunk shows that the call will take longer than
        ``laplace_hfl.engine.progress.AUTO_PROGRESS_AFTER_S`` (10 s); short calls
        stay quiet.
    amortize : int or None, default=None
        Amortised mode (keyword-only, ``target="ggn"`` only): the number ``S`` of
        posterior samples drawn once in :meth:`fit` by sample-then-optimise
        (``S`` perturbed refits of the linearised network, solved together).
        Every prediction then costs ``S`` Jacobian-vector products and no pass
        over the training data, and ``state_dict()`` holds the samples, so a
        loaded estimator predicts without the data. The covariance is an
        unbiased Monte Carlo estimate of ``J (GGN + prior)^{-1} J^T`` with
        relative standard error ``sqrt(2 / S)`` per variance. How the samples
        are drawn: with ``minibatch_epochs=None`` (default) by full-batch CG to
        a relative residual ``max(rtol, 0.01 sqrt(2 / S))``, a hundredth of the
        Monte Carlo error (each CG iteration is one pass over the data for
        ``chunk_size`` samples; right for small data or when exactness
        matters); with ``minibatch_epochs=E`` by minibatch sample-then-optimise
        at training cost: one pass to draw the right-hand sides, ``E`` epochs
        of preconditioned SGD over the loader's batches started at the prior
        sample, one pass to measure the full-batch residual (use it when the
        data or ``P`` make full-batch CG too slow). Samples are processed
        ``chunk_size`` at a time in both cases (memory ``~6 chunk_size P``,
        not ``S P``, besides the ``S P`` samples kept). Unconverged samples
        (CG residual above that tolerance, or SGD full-batch residual above
        ``max(rtol, 0.1)``) raise a ``RefitConvergenceWarning`` with the
        numbers. See :mod:`laplace_hfl.engine.amortized`.
    amortize_deflation : int or None, default=None
        Deflated amortised answers (keyword-only, with ``amortize=S``): the top
        ``k`` directions ``W`` of the Nyström sketch of the GGN are handled
        exactly and the samples only for the rest (projected off them), so
        the estimate stays unbiased with a smaller Monte Carlo error at equal
        ``S`` (:mod:`laplace_hfl.engine.deflated_samples`; median variance
        error 0.39-0.72x the plain samples' on the test networks at S = 64,
        docs/cost.md). Costs ``k`` GGN products once per hyperparameters (a
        sketch of rank ``k`` too where the preconditioner holds none) and
        ``k`` more JVPs per query point. ``A W`` is recomputed from the
        training data, not stored: a loaded state without data raises
        ``HFLNotFittedError`` until ``fit``. ``None`` or ``0``: off (the
        plain samples); at most ``precondition_rank`` when that is set.
    precondition_rank : int or None, default=None
        Rank ``k`` of the randomised Nyström preconditioner of the refit solves
        (keyword-only): ``k`` GGN-vector products once per fit, ``2 k P``
        memory, typically 5-10x fewer CG iterations. ``None`` caps it, on
        the CPU, at ``min(1024, P // 2)`` when that sketch fits in 1 GiB
        (``P`` up to ~130k; no preconditioner above), on a GPU at the rank its
        free memory allows (up to 1,024), and never above ``N C`` (the GGN's
        largest rank). With ``preconditioner="auto"`` the rank below that cap
        is chosen by cost: the sketch starts at 64 columns and grows (by its
        new columns only) while the CG iterations it is expected to save on a
        chunk of directions repay its products and eigendecomposition; a
        sketch of the whole GGN (``min(P, N C)`` columns, at most three CG
        iterations of a chunk) is taken at once (it follows the machine's
        measured costs: set an integer to pin it). ``0`` switches it off. It
        changes how fast refits converge, never what they converge to.
    minibatch_epochs : int or None, default=None
        Minibatch refits (keyword-only, ``target="ggn"``): instead of full-batch
        CG, run the perturbed refits by preconditioned SGD, one training batch
        per step, for this many epochs, with iterate averaging over the second
        half (:mod:`laplace_hfl.engine.stochastic`). For data too large for many full
        passes; combine with ``fit(..., cache_data=False)`` and a shuffling
        loader. One step is one batch of the loader (also with
        ``cache_data=True``: cached blocks are cut back into the loader's
        batches). Converges to the same answer in expectation; the full-batch
        relative residual of the result is in ``la.last_diagnostics.residual``
        and a ``RefitConvergenceWarning`` names it when it exceeds
        ``max(rtol, 0.1)`` (the variances are then biased low by about that
        fraction). With ``amortize=S``: draw the ``S`` samples this way.
    solver : {"auto", "dense", "cg"}, default="auto"
        How the refit solves ``(h G + diag(p_0)) u = v`` are done (keyword-only).
        ``"dense"`` forms the refit curvature once per fit (data GGN from
        per-example Jacobians of the cached batches; the exact Hessian from
        Hessian-vector products for ``target="hessian"``; never a curvature
        backend) and solves by one Cholesky factor, refactored only when the
        prior precision, ``sigma_noise`` or the temperature change and reused
        by every query, grid-search step and prediction; it holds ``2 P^2``
        numbers. ``"cg"`` runs the iterative refits. ``"auto"`` is ``"dense"``
        where ``4 P^2`` numbers fit half the device's free memory (capped by
        ``laplace_hfl.engine.dense.DENSE_BUDGET`` when set) and the dense solver's
        one-off cost, estimated from a timed GGN-vector product and the
        measured flop rate, is below three chunks of CG refits (with the probed
        iterations); ``"cg"`` otherwise. Problems under 1e8 flops go dense
        without a probe; with ``target="hessian"`` ``"auto"`` is dense up to
        ``P = 2896`` (``laplace_hfl.engine.dense.CHUNK_BUDGET``), whose Newton refits
        a linear probe cannot price. Same answer, to the CG tolerance
        (and, for ``target="hessian"``, without the ``O(eps^2)`` bias of the
        central differences). Amortised and minibatch modes keep their own
        paths. The choice and its reason: ``la.last_diagnostics.choice``.
    preconditioner : {"auto", "kfac", "nystrom", "none"}, default="auto"
        Preconditioner of the CG refits (keyword-only). ``"kfac"``: laplace-torch's
        Kronecker-factored GGN (``CurvlinopsGGN.kron``, on a deep copy of the
        model) with the prior and ``sigma_noise`` folded in exactly through the
        factors' eigendecompositions (a diagonal prior enters by its mean per
        parameter tensor); ``Linear``/``Conv2d`` layers only. ``"nystrom"``: the
        rank-``precondition_rank`` Nyström sketch. ``"auto"``: a probe at the
        first solve of a fit runs the candidates (the sketch, KFAC where it
        covers every refit parameter and the others need more than 5
        iterations, none) for a few CG iterations on the refit system and
        keeps the one needing the fewest iterations, the sketch at the rank
        its cost repays (see ``precondition_rank``;
        :mod:`laplace_hfl.engine.auto_choice`); ``"nystrom"`` is chosen when
        ``precondition_rank`` is given, and in amortised and minibatch modes.
        No fixed rule fits every network: a 5-20-1 tanh net (P = 141,
        N = 200) took 176 iterations with KFAC, 89 without and 9 with the
        sketch, while on LeNet (1,000 digits) KFAC took > 1,000, plain CG
        ~450 and the sketch ~25. The choice is in
        ``la.last_diagnostics.preconditioner`` (why: ``.choice``). It changes
        how fast refits converge, never what they converge to.

    Raises
    ------
    ValueError
        Unknown ``target``, non-positive ``eps``/``rtol``, unsupported likelihood.
    NotImplementedError
        ``enable_backprop=True`` together with ``amortize``.
"""
