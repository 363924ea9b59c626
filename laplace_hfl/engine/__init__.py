"""The numerical engine of laplace-hfl: pure functions and small objects.

Nothing here holds estimator state or knows laplace-torch's classes: the
Laplace objective over flat parameters and its curvature products
(:mod:`~laplace_hfl.engine.functional`), the perturbed refits
(:mod:`~laplace_hfl.engine.refit`), solvers and preconditioners, the dense
path, quadrature for log-determinants and variance bounds, and the data
plumbing they share. The laplace-torch classes in :mod:`laplace_hfl` hold the
state and call in here; modules here import only each other and
:mod:`laplace_hfl.errors`.
"""
