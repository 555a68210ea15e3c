"""Preconditioned conjugate gradient that reports non-positive curvature."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._errors import NonFiniteError
from ._result import (
    Problem,
    SolveResult,
    _norm,
    as_preconditioner,
    callbacks,
    measurable_residual,
    report,
    stopping_threshold,
)

__all__ = ["cg"]

MAX_CHECKS = 3  # true-residual checks (one product each) before giving up on a drifting recursion


def cg(
    A,
    b,
    *,
    x0=None,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    M=None,
    callback: Callable | None = None,
    damping: float = 0.0,
    check_residual: bool = True,
    warn: bool = True,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I) x = b` by preconditioned conjugate gradient.

    Stopping rule: :math:`\|b - A x_k\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})`, with the
    recursively updated residual (SciPy's semantics). With ``check_residual`` (default)
    the true residual is computed when the recursive one meets the tolerance (one
    product); if it misses by more than the floor at which a residual can be measured in
    the operator's dtype (``20 eps ||b||``), CG continues from the true residual (residual
    replacement, at most three times) and otherwise reports ``converged=False``.

    CG needs a symmetric positive-definite operator. When it meets a direction
    with :math:`p^\top A p \le 0` it stops *before* stepping along it, returns the
    last iterate with ``negative_curvature=True`` and ``converged=False``, and warns
    (:class:`~second.NegativeCurvatureWarning`). Use :func:`minres` for indefinite
    systems such as the Hessian away from a minimum.

    Args:
        A: a :class:`~second.LinearOperator`, a dense tensor, or a callable matvec.
        b: right-hand side, flat or a sequence of parameter-shaped tensors.
        x0: starting point (default zero).
        tol: relative tolerance.
        atol: absolute tolerance.
        maxiter: iteration limit (default ``10 n``).
        M: preconditioner approximating :math:`A^{-1}` (operator, tensor or callable).
        callback: called with the iterate after every iteration.
        damping: :math:`\lambda \ge 0`.
        check_residual: verify the true residual at the end.
        warn: warn on non-convergence / negative curvature (default ``True``).

    Returns:
        A :class:`~second.SolveResult`.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> res = cg(A, b, tol=1e-10)
        >>> res.converged, res.iterations
        (True, 2)
        >>> torch.allclose(A @ res.x, b)
        True

    References:
        Hestenes & Stiefel (1952); Nocedal & Wright, *Numerical Optimization*, Alg. 5.3.
    """
    pb = Problem(A, b, x0, damping)
    op, n = pb.A, pb.n
    Minv = as_preconditioner(M, n, pb.b.dtype, pb.b.device)
    maxiter = 10 * n if maxiter is None else int(maxiter)
    bnorm = _norm(pb.b)
    threshold = stopping_threshold(bnorm, tol, atol)
    x = torch.zeros_like(pb.b) if pb.x0 is None else pb.x0.clone()
    r = pb.b.clone() if pb.x0 is None else pb.b - op @ x
    rnorm = _norm(r)
    history = [rnorm]
    if rnorm <= threshold:
        return pb.result(
            x,
            converged=True,
            iterations=0,
            residual_norms=history,
            message="x0 already satisfies the tolerance",
            method="cg",
        )
    z = Minv @ r if Minv is not None else r
    p = z.clone()
    rz = torch.dot(r, z)
    checks = 0
    for k in range(1, maxiter + 1):
        Ap = op @ p
        pAp = torch.dot(p, Ap)
        if not math.isfinite(float(pAp)):
            raise NonFiniteError(f"cg: the product A p is not finite at iteration {k}")
        if float(pAp) <= 0.0:
            return report(
                pb.result(
                    x,
                    converged=False,
                    iterations=k - 1,
                    residual_norms=history,
                    negative_curvature=True,
                    negative_curvature_iteration=k,
                    message=(
                        f"non-positive curvature p^T A p = {float(pAp):.3e} at iteration {k}: "
                        "the operator is not positive definite; stopped before stepping along it "
                        "(use minres, damping, or the Gauss-Newton matrix)"
                    ),
                    method="cg",
                ),
                warn,
            )
        alpha = rz / pAp
        x.add_(p, alpha=float(alpha))
        r.sub_(Ap, alpha=float(alpha))
        rnorm = _norm(r)
        history.append(rnorm)
        callbacks(callback, x, pb)
        if rnorm <= threshold:
            info, ok = {}, True
            if check_residual:
                true_vec = pb.b - op @ x
                true_r = _norm(true_vec)
                floor = measurable_residual(op.dtype, bnorm)
                info.update(true_residual=true_r, measurable_residual=floor)
                ok = true_r <= threshold + floor
            if ok:
                return pb.result(
                    x,
                    converged=True,
                    iterations=k,
                    residual_norms=history,
                    info=info,
                    message=f"converged: ||r|| = {rnorm:.3e} <= {threshold:.3e}",
                    method="cg",
                )
            if checks >= MAX_CHECKS or k == maxiter:
                msg = (
                    f"the recursive residual reached the tolerance but the true residual is "
                    f"{true_r:.3e} > {threshold:.3e} (+ rounding floor {floor:.1e})"
                )
                res = pb.result(
                    x,
                    converged=False,
                    iterations=k,
                    residual_norms=history,
                    info=info,
                    message=msg,
                    method="cg",
                )
                return report(res, warn)
            # residual replacement: continue from the true residual
            checks += 1
            r = true_vec
            history[-1] = true_r
        if Minv is not None:
            z = Minv @ r
            if float(torch.dot(r, z)) <= 0:
                raise ValueError("the preconditioner M is not positive definite (r^T M r <= 0)")
        else:
            z = r
        rz_new = torch.dot(r, z)
        beta = rz_new / rz
        rz = rz_new
        p.mul_(float(beta)).add_(z)
    return report(
        pb.result(
            x,
            converged=False,
            iterations=maxiter,
            residual_norms=history,
            message=f"did not converge in {maxiter} iterations: ||r|| = {rnorm:.3e} > {threshold:.3e}",
            method="cg",
        ),
        warn,
    )
