"""Exceptions and warnings raised by ``second``."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Iterator

__all__ = [
    "SecondDeprecationWarning",
    "ConvergenceWarning",
    "NegativeCurvatureWarning",
    "NonDeterministicDataError",
    "NonFiniteError",
]


class SecondDeprecationWarning(DeprecationWarning):
    """A deprecated spelling of ``second``'s own API; the message says what to write instead.

    A ``DeprecationWarning`` (every filter on that category applies); its own class lets
    the test suite turn the uses of ``second``'s deprecated names into errors without
    touching other libraries' deprecations.
    """


class ConvergenceWarning(UserWarning):
    """An iterative method stopped before meeting its tolerance, or diverged."""


class NegativeCurvatureWarning(UserWarning):
    """A method that needs a positive-definite operator met non-positive curvature."""


class NonFiniteError(FloatingPointError):
    """A curvature product or solver produced NaN or Inf."""


class NonDeterministicDataError(RuntimeError):
    """The data iterable, or the model, gave different results on two passes.

    Dataset-level curvature products traverse the data once per product. If the
    batches change between passes (a shuffling ``DataLoader``) or the model is
    stochastic (dropout in training mode), the "operator" is a different matrix
    on every call and iterative solvers silently produce garbage.
    """


@contextlib.contextmanager
def quiet_batching_notes() -> Iterator[None]:
    """Silence torch's note that an operation without a batching rule runs in a slow loop.

    The result is right either way; the note names internal operators (``aten::...``) the
    user cannot change. Used around the library's own ``vmap`` calls.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        yield


@functools.cache
def _internal_dirs() -> tuple[str, ...]:
    import torch

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep  # second/
    return (os.path.dirname(os.path.abspath(torch.__file__)) + os.sep, here)


def outside_stacklevel() -> int:
    """The ``stacklevel`` that points a ``warnings.warn`` in the caller at the user's line.

    The first frame outside ``second`` and ``torch``: a step runs under torch's ``no_grad``
    decorator, and a warning raised in a backward pass under the autograd engine, at depths
    that depend on how they were called.
    """
    frame = sys._getframe(1)
    level = 1
    internal = _internal_dirs()
    while frame.f_back is not None and frame.f_code.co_filename.startswith(internal):
        frame = frame.f_back
        level += 1
    return level
