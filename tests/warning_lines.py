"""Shared helpers for the warning-line tests: a warning must point at the caller's line.

``caught_at`` records the warnings a callable raises and asserts each one's file and line
fall inside the body of the test code that made the library call. The line matters, not
only the file: a stacklevel one frame too large would otherwise land at the call of that
code (here, in this module; in a test's own helper before, in the test's file too).

``spectrum_matrix`` builds the symmetric matrices with a chosen eigenvalue range that the
solver and implicit tests drive into non-convergence or negative curvature.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def code_lines(fn: Callable[..., Any]) -> set[int]:
    """The source lines of ``fn``'s body (its code object's line table)."""
    return {line for _, _, line in fn.__code__.co_lines() if line is not None}


def recorded(
    fn: Callable[..., Any],
    category: type[Warning] = Warning,
    match: str = "",
    *,
    args: tuple = (),
) -> list[warnings.WarningMessage]:
    """The warnings of ``category`` whose message contains ``match`` that ``fn(*args)`` raised.

    At least one must have been raised; where they point is not checked.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn(*args)
    caught = [w for w in caught if issubclass(w.category, category) and match in str(w.message)]
    assert caught, f"no {category.__name__} matching {match!r}"
    return caught


def caught_at(
    fn: Callable[..., Any],
    category: type[Warning] = Warning,
    match: str = "",
    *,
    at: Callable[..., Any] | None = None,
    args: tuple = (),
) -> list[warnings.WarningMessage]:
    """The warnings ``recorded(fn, category, match, args=args)``; each must point inside ``at``.

    ``at`` (``fn`` unless given) is the test's function or lambda that made the library call:
    every warning's file must be its ``co_filename`` and its line one of ``code_lines(at)``.
    """
    caught = recorded(fn, category, match, args=args)
    at = fn if at is None else at
    filename, lines = at.__code__.co_filename, code_lines(at)
    where = [(w.filename, w.lineno) for w in caught]
    assert all(w.filename == filename and w.lineno in lines for w in caught), (
        f"expected {filename} lines {sorted(lines)}, got {where}"
    )
    return caught


def spectrum_matrix(low: float, high: float, n: int) -> torch.Tensor:
    """A dense float64 symmetric ``n x n`` matrix with eigenvalues ``linspace(low, high, n)``.

    The eigenvectors are a fixed (seed 0) random orthogonal basis.
    """
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.linspace(low, high, n, dtype=torch.float64)) @ Q.T
