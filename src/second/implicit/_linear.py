"""The linear solve every implicit gradient needs, with CG -> MINRES fallback."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._errors import NegativeCurvatureWarning
from ..operators.base import CallableOperator
from ..solvers import SolveResult, report, solve

__all__ = ["default_tol", "solve_symmetric", "solve_options", "METHODS", "SOLVE_OPTIONS"]

METHODS = ("auto", "cg", "minres", "dense", "neumann")

#: The keywords of the public implicit functions that go on to :func:`solve_symmetric`.
SOLVE_OPTIONS = ("method", "tol", "atol", "maxiter", "damping", "warn")


def solve_options(arguments: dict) -> dict:
    """The :data:`SOLVE_OPTIONS` among a function's arguments (its ``locals()``).

    Example:
        >>> solve_options(dict(method="cg", tol=None, atol=0.0, maxiter=5, damping=0.1,
        ...                    warn=True, params=None))
        {'method': 'cg', 'tol': None, 'atol': 0.0, 'maxiter': 5, 'damping': 0.1, 'warn': True}
    """
    return {name: arguments[name] for name in SOLVE_OPTIONS}


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
    stacklevel: int = 4,
) -> SolveResult:
    """Solve ``(A + damping I) x = b`` for a symmetric ``A`` known by ``matvec``.

    ``method="auto"`` runs CG and, if CG meets non-positive curvature, warns
    (:class:`~second.NegativeCurvatureWarning`) and restarts with MINRES from CG's
    last iterate. Any other method is passed to :func:`second.solve`.
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
                stacklevel=stacklevel,
            )
        cg_matvecs = res.matvecs
        kwargs["x0"] = res.x
        res = solve(op, b, "minres", warn=warn, **kwargs)
        res.matvecs += cg_matvecs
        res.info["fallback_from"] = "cg"
        res.method = "cg->minres"
    elif not res.converged and warn:
        report(res, warn, stacklevel=stacklevel)
    return res
