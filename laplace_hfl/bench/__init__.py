"""Evaluation, benchmarks and the ``laplace-hfl`` command line.

Built on the public API of :mod:`laplace_hfl` and of laplace-torch only.
Needs the optional dependencies of ``pip install laplace-hfl[bench]``
(matplotlib, scikit-learn, mlxtend); ``import laplace_hfl`` never imports
this package.
"""
