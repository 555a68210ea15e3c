"""The linear solve every implicit gradient needs, with CG -> MINRES fallback."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._errors import ConvergenceWarning, NegativeCurvatureWarning, outside_stacklevel
from ..func.vectors import parameters_to_vector
from ..operators.base import CallableOperator
from ..solvers import SolveResult, report, solve

__all__ = [
    "default_tol",
    "solve_symmetric",
    "solve_options",
    "check_damping",
    "newton_step",
    "warn_if_unsolved",
    "METHODS",
    "SOLVE_OPTIONS",
    "NEWTON_TOL",
]

METHODS = ("auto", "cg", "minres", "dense", "neumann")

#: The keywords of the public implicit functions that go on to :func:`solve_symmetric`.
SOLVE_OPTIONS = ("method", "tol", "atol", "maxiter", "damping", "warn")

#: Relative residual tolerance of the Newton-step estimate behind ``inner_tol``: the check
#: needs the step's size to a few percent, not the step itself.
NEWTON_TOL = 1e-2


def solve_options(arguments: dict) -> dict:
    """The :data:`SOLVE_OPTIONS` among a function's arguments (its ``locals()``), checked.

    Raises:
        ValueError: ``damping`` is negative or not finite (:func:`check_damping`).

    Example:
        >>> solve_options(dict(method="cg", tol=None, atol=0.0, maxiter=5, damping=0.1,
        ...                    warn=True, params=None))
        {'method': 'cg', 'tol': None, 'atol': 0.0, 'maxiter': 5, 'damping': 0.1, 'warn': True}
    """
    check_damping(arguments["damping"])
    return {name: arguments[name] for name in SOLVE_OPTIONS}


def check_damping(damping: float) -> None:
    """Refuse a damping that is not a finite number ``>= 0``.

    In implicit differentiation the damping regularizes the inner problem's Jacobian
    (Tikhonov): a negative one would shift a positive definite Hessian towards singular
    or indefinite and change the implicit gradient, not stabilize it.

    Raises:
        ValueError: ``damping < 0``, NaN or infinite.
        TypeError: ``damping`` is not a real number.

    Example:
        >>> check_damping(-1.0)
        Traceback (most recent call last):
        ...
        ValueError: damping must be a finite number >= 0, got -1.0...
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float, torch.Tensor)):
        raise TypeError(f"damping must be a real number, got {type(damping).__name__}")
    value = float(damping)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"damping must be a finite number >= 0, got {damping!r}: in implicit "
            "differentiation it is Tikhonov damping of the inner problem's Jacobian, and a "
            "negative shift would move it towards a singular or indefinite matrix"
        )


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance reachable in ``dtype`` (1e-10 in float64, 1e-5 in float32)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


def solve_symmetric(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    method: str,
    tol: float | None,
    atol: float,
    maxiter: int | None,
    damping: float,
    x0: Tensor | None = None,
    psd: bool = False,
    warn: bool = True,
    what: str = "the inner Hessian",
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` for a symmetric ``A`` known by ``matvec``.

    ``method="auto"`` runs CG and, if CG meets non-positive curvature, warns
    (:class:`~second.NegativeCurvatureWarning`) and restarts with MINRES from CG's
    last iterate. Any other method is passed to :func:`second.solve`. Its warnings point at
    the first line outside ``second`` and torch (the user's call, or their ``backward()``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if tol is None:
        tol = default_tol(b.dtype)
    op = CallableOperator(matvec, b.numel(), b.dtype, b.device)
    op.psd = psd
    kwargs: dict[str, Any] = dict(damping=damping, tol=tol, atol=atol, maxiter=maxiter, x0=x0)
    if method != "auto":
        if method == "neumann":
            kwargs.pop("x0")
        return solve(op, b, method, warn=warn, **kwargs)
    res = solve(op, b, "cg", warn=False, **kwargs)
    if res.negative_curvature:
        if warn:
            warnings.warn(
                f"{what} has non-positive curvature (CG met p^T A p <= 0 at iteration "
                f"{res.negative_curvature_iteration}): the parameters are not at a strict "
                "minimum of the inner problem, so the implicit gradient is that of a saddle "
                "point or a flat direction; switching to MINRES (add damping, or run the "
                "inner solver longer, if a minimum was intended)",
                NegativeCurvatureWarning,
                stacklevel=outside_stacklevel(),
            )
        cg_matvecs = res.matvecs
        kwargs["x0"] = res.x
        res = solve(op, b, "minres", warn=warn, **kwargs)
        res.matvecs += cg_matvecs
        res.info["fallback_from"] = "cg"
        res.method = "cg->minres"
    elif not res.converged and warn:
        report(res, warn)
    return res


def newton_step(
    matvec: Callable[[Tensor], Tensor], g: Tensor, *, damping: float, maxiter: int | None
) -> float:
    r"""Estimate :math:`\|(A + \lambda I)^{-1} g\|`, the Newton step from the current point.

    For an optimality residual ``g`` (the inner gradient, or :math:`F(w)`) and its
    symmetric Jacobian ``A`` known by ``matvec``, the step is the distance to the root
    to first order. Solved by CG (MINRES on non-positive curvature) to the relative
    residual :data:`NEWTON_TOL`, quietly: the estimate only feeds a warning.

    Example:
        >>> A = torch.diag(torch.tensor([2.0, 4.0], dtype=torch.float64))
        >>> newton_step(lambda v: A @ v, torch.tensor([2.0, 0.0], dtype=torch.float64),
        ...             damping=0.0, maxiter=None)
        1.0
    """
    if not bool(g.any()):
        return 0.0
    res = solve_symmetric(
        matvec,
        g,
        method="auto",
        tol=NEWTON_TOL,
        atol=0.0,
        maxiter=maxiter,
        damping=damping,
        warn=False,
    )
    x = parameters_to_vector(res.x)
    return float(torch.linalg.vector_norm(x.detach()))


def warn_if_unsolved(
    step: float,
    w_norm: float,
    residual: float,
    inner_tol: float,
    *,
    what: str,
    matrix: str,
    residual_name: str,
    consequence: str,
) -> bool:
    r"""Warn (:class:`~second.ConvergenceWarning`) unless ``step <= inner_tol * w_norm``.

    The relative test of ``inner_tol``: the Newton step (the estimated distance to the
    root) must be at most ``inner_tol`` times the norm of the variables. It does not
    change when the inner objective is multiplied by a constant, nor when the variables
    are rescaled. Returns whether it warned; the warning points at the user's line.
    """
    if step <= inner_tol * w_norm:
        return False
    warnings.warn(
        f"{what}: the Newton step ||{matrix}^-1 {residual_name}|| = {step:.3e} (the estimated "
        f"distance to the solution) > inner_tol * ||params|| = {inner_tol:.1e} * {w_norm:.3e} "
        f"(||{residual_name}|| = {residual:.3e}). The implicit function theorem holds at a "
        f"solution; away from it {consequence} is wrong by an amount that grows with this "
        "distance (run the inner solver longer, or pass inner_tol=None)",
        ConvergenceWarning,
        stacklevel=outside_stacklevel(),
    )
    return True
