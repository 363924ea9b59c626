"""One call at a time per estimator, and failed calls that change nothing.

:func:`serialise_public_api` wraps every public method and property of an HFL
class so that

* each call holds the estimator's ``threading.RLock`` for its whole duration:
  calls from several threads on one estimator run one after the other and give
  the results of serial calls (the caches of the estimator, its base point,
  factors and samples, are shared by its calls);
* the calls that change the estimator's state (:data:`TRANSACTIONS`) commit
  all or nothing: on any exception the estimator's attributes are put back as
  they were before the call;
* transient tensors the refits leave behind (:meth:`_release_transients`, e.g.
  the features the last-layer extractor's hook stored while under a
  ``torch.func`` transform) are dropped after each call.

The lock is not pickled (``__getstate__``); an unpickled estimator gets a new
one. The operator ``la.H`` (a closure over the estimator) is rebuilt on
unpickling instead of being pickled.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["TRANSACTIONS", "SerialMixin", "serialise_public_api"]

#: Public methods that change the estimator's state: all or nothing.
TRANSACTIONS = frozenset(
    {"fit", "load_state_dict", "optimize_prior_precision", "log_marginal_likelihood"}
)

_LOCK_ATTR = "_call_lock"
_CREATE = threading.Lock()


def _lock_of(obj: Any) -> threading.RLock:
    lock = obj.__dict__.get(_LOCK_ATTR)
    if lock is None:
        with _CREATE:
            lock = obj.__dict__.setdefault(_LOCK_ATTR, threading.RLock())
    return lock


def _serial(fn: Callable, transaction: bool) -> Callable:
    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _lock_of(self):
            saved = dict(self.__dict__) if transaction else None
            try:
                return fn(self, *args, **kwargs)
            except BaseException:
                if saved is not None:  # commit nothing
                    self.__dict__.clear()
                    self.__dict__.update(saved)
                raise
            finally:
                self._release_transients()

    call.__hfl_serial__ = True
    return call


def serialise_public_api(cls: type) -> None:
    """Wrap ``cls``'s public methods and properties (inherited ones included)
    in the estimator's lock; :data:`TRANSACTIONS` also roll back on error."""
    for name in dir(cls):
        if name.startswith("_") and name != "__call__":
            continue
        attr = getattr(cls, name, None)
        if isinstance(attr, property):
            if getattr(attr.fget, "__hfl_serial__", False):
                continue
            fget = attr.fget and _serial(attr.fget, False)
            fset = attr.fset and _serial(attr.fset, False)
            setattr(cls, name, property(fget, fset, attr.fdel, attr.__doc__))
        elif callable(attr) and not isinstance(attr, type):
            raw = cls.__dict__.get(name, attr)
            if isinstance(raw, staticmethod | classmethod):
                continue
            if getattr(attr, "__hfl_serial__", False):
                continue
            setattr(cls, name, _serial(attr, name in TRANSACTIONS))


class SerialMixin:
    """Pickling without the lock; subclasses name their transient tensors."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        serialise_public_api(cls)

    def _release_transients(self) -> None:
        """Drop tensors a call leaves behind that no later call needs."""

    def __getstate__(self) -> dict[str, Any]:
        with _lock_of(self):
            self._release_transients()
            state = dict(self.__dict__)
        state.pop(_LOCK_ATTR, None)
        state.pop("H", None)  # a closure over the estimator: rebuilt on load
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if state.get("_fitted"):
            self.H = self._curvature_operator()
        else:
            self._init_H()
