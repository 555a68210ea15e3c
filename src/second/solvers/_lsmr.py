"""LSMR for least-squares problems with rectangular or nonsymmetric operators."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import NonFiniteError
from ..operators.base import aslinearoperator
from ._result import (
    SolveResult,
    _norm,
    check_magnitude,
    check_x0,
    measurable_residual,
    report,
    stopping_threshold,
)

__all__ = ["lsmr"]

MAX_CHECKS = 3  # recomputed-residual checks (two products each) before giving up on the estimates


def lsmr(
    A,
    b: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    x0: Tensor | None = None,
    callback: Callable[[Tensor], None] | None = None,
    warn: bool = True,
) -> SolveResult:
    r"""Solve the (damped) least-squares problem :math:`\min_x \|A x - b\|^2 + \lambda \|x\|^2` by LSMR.

    ``A`` is any ``m x n`` operator: tall, wide, square and nonsymmetric, rank deficient.
    LSMR (Fong & Saunders, 2011) runs Golub-Kahan bidiagonalization, two products per
    iteration (one with :math:`A`, one with :math:`A^\top`), and minimizes the
    normal-equation residual :math:`\|A^\top r_k - \lambda x_k\|` over the Krylov space. It
    is MINRES on the normal equations

    .. math:: (A^\top A + \lambda I)\, x = A^\top b, \qquad \lambda = \texttt{damping} \ge 0,

    without forming them. ``damping`` here is the weight :math:`\lambda` of the
    regularizer (SciPy's ``damp`` is :math:`\sqrt\lambda`), not the shift of a square solve
    :math:`(A + \lambda I) x = b`: for that, pass ``A.damped(lam)``. Started from zero, the
    iterates of an underdetermined system stay in the row space of :math:`A`, so LSMR
    returns the minimum-norm solution.

    Stopping rule, on the augmented system :math:`\bar A = [A; \sqrt\lambda I]`,
    :math:`\bar r = [b - A x; -\sqrt\lambda x]` (:math:`\bar r = r` without damping):
    :math:`\|\bar r\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})` (a compatible system)
    or :math:`\|\bar A^\top \bar r\| \le \mathrm{tol}\, \|\bar A\|\, \|\bar r\|` (a
    least-squares solution; :math:`\|\bar A\|` is LSMR's running Frobenius-norm estimate,
    a lower bound). When the recurrence's estimates meet either, both residuals are
    recomputed from ``x`` (two products) and ``converged`` is ``True`` only if the
    recomputed ones meet it, within the rounding floors :math:`20\varepsilon\|b\|` and
    :math:`20\varepsilon\|\bar A\|\|b\|` of the dtype (as for the other solvers); otherwise
    the iteration goes on with a tightened internal tolerance (at most three checks). An
    ill-conditioned problem in float32 can stop short of these floors (the best representable
    :math:`x` leaves :math:`\|A^\top r\| \approx \varepsilon \|A\|^2 \|x\|`) and is then
    reported as not converged.

    Args:
        A: an ``m x n`` :class:`~second.LinearOperator` (with a transposed product), a
            dense matrix, a SciPy operator, or a callable for a symmetric square one.
        b: right-hand side, a flat tensor of length ``m``.
        damping: :math:`\lambda \ge 0`, the weight of :math:`\|x\|^2` (default ``0``).
        tol: relative tolerance of both tests (SciPy's ``atol`` and ``btol``; default ``1e-6``).
        atol: absolute tolerance on :math:`\|\bar r\|` (default ``0``).
        maxiter: iteration limit (default ``5 min(m, n)``).
        x0: starting point, length ``n`` (default zero). With damping, the problem stays
            :math:`\min \|Ax - b\|^2 + \lambda\|x\|^2` (not a damped correction to ``x0``).
        callback: called with the iterate ``x`` after each iteration.
        warn: warn (:class:`~second.ConvergenceWarning`) when not converged (default ``True``).

    Returns:
        A :class:`~second.SolveResult`. ``residual_norms`` holds the estimates of
        :math:`\|\bar r_k\|` (the last one recomputed); ``info`` holds
        ``normal_residual_norms`` (estimates of :math:`\|\bar A^\top \bar r_k\|`),
        ``true_residual`` and ``normal_residual`` (recomputed), ``norm_A`` and ``cond_A``
        (LSMR's estimates of :math:`\|\bar A\|_F` and its condition number), ``checks`` (the
        recomputations made) and ``stop`` (``"compatible"``, ``"least_squares"`` or ``None``). ``matvecs`` counts products
        with :math:`A` and with :math:`A^\top`.

    Raises:
        ValueError: a ``b`` that is not a finite flat vector, a shape mismatch, negative or
            non-finite ``damping``, ``tol`` or ``atol``.
        TypeError: complex or non-floating dtypes, a dtype mismatch.
        NotImplementedError: an operator without a transposed product.

    Example:
        >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        >>> b = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        >>> res = lsmr(A, b, tol=1e-10)          # tall: the least-squares solution
        >>> res.x, res.converged, res.info["stop"]
        (tensor([1.3333, 2.3333], dtype=torch.float64), True, 'least_squares')
        >>> lsmr(A, b, damping=1.0, tol=1e-10).x  # (A^T A + I) x = A^T b
        tensor([1.1250, 1.6250], dtype=torch.float64)

    References:
        D. C.-L. Fong and M. A. Saunders, "LSMR: An iterative algorithm for sparse
        least-squares problems", SIAM J. Sci. Comput. 33 (2011). The recurrences follow
        ``scipy.sparse.linalg.lsmr``.
    """
    op, b, x0 = _validate(A, b, x0)
    check_magnitude(b.reshape(-1, 1), "lsmr")
    m, n = op.shape
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"lsmr needs a finite damping >= 0 (the weight of ||x||^2), got {damping}")
    threshold = stopping_threshold(_norm(b), tol, atol)  # validates tol and atol
    maxiter = 5 * min(m, n) if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    bnorm = _norm(b)
    if bnorm == 0.0 or m == 0 or n == 0:  # x = 0 minimizes ||A x||^2 + damping ||x||^2
        res = SolveResult(
            x=b.new_zeros(n),
            converged=True,
            iterations=0,
            matvecs=0,
            residual_norms=[0.0 if m == 0 else bnorm],
            message="b = 0: x = 0" if bnorm == 0.0 else "an empty system: x = 0",
            method="lsmr",
            info={"stop": "compatible"},
        )
        return res

    sq = math.sqrt(damping)
    AT = op.adjoint()
    count = [0]

    def mv(v: Tensor) -> Tensor:  # the augmented product [A; sq I] v
        count[0] += 1
        Av = op @ v
        return torch.cat([Av, sq * v]) if sq else Av

    def rmv(u: Tensor) -> Tensor:  # [A; sq I]^T u
        count[0] += 1
        ATu = AT @ u[:m]
        return ATu + sq * u[m:] if sq else ATu

    floor1 = measurable_residual(b.dtype, bnorm)

    def check(x: Tensor, normA: float) -> _Check:
        """The recomputed ||r_bar|| and ||A_bar^T r_bar||, and whether they meet the rule."""
        r = b - op @ x
        count[0] += 1
        g = rmv(torch.cat([r, -sq * x]) if sq else r)
        rbar = math.sqrt(_norm(r) ** 2 + damping * _norm(x) ** 2)
        normal = _norm(g)
        floor2 = normA * floor1  # A^T applied to a residual measured to 20 eps ||b||
        compatible = rbar <= threshold + floor1
        least_squares = normal <= tol * normA * rbar + floor2
        stop = "compatible" if compatible else "least_squares" if least_squares else None
        return _Check(rbar, normal, floor2, stop)

    # -- initialization: beta u = b_bar - A_bar x0, alpha v = A_bar^T u --------------------
    x = b.new_zeros(n) if x0 is None else x0.clone()
    if x0 is None:
        u = torch.cat([b, b.new_zeros(n)]) if sq else b.clone()
    else:
        u = torch.cat([b - (op @ x0), -sq * x0]) if sq else b - (op @ x0)
        count[0] += 1
    beta = _norm(u)
    history, normal_history = [beta], []
    if beta <= threshold:
        normal_history.append(float("nan"))
        info = {"stop": "compatible", "true_residual": beta}
        message = "x0 already satisfies the tolerance"
        return _finish(x, True, 0, count[0], history, normal_history, message, info, warn)
    u = u / beta
    v = rmv(u)
    alpha = _norm(v)
    normal_history.append(alpha * beta)
    if alpha == 0.0:  # A_bar^T r_bar = 0, computed: x0 is a least-squares solution
        info = {"stop": "least_squares", "true_residual": beta, "normal_residual": 0.0}
        message = "x0 is a least-squares solution: A^T r = 0"
        return _finish(x, True, 0, count[0], history, normal_history, message, info, warn)
    v = v / alpha

    zetabar, alphabar, rho, rhobar, cbar, sbar = alpha * beta, alpha, 1.0, 1.0, 1.0, 0.0
    h, hbar = v.clone(), torch.zeros_like(v)
    betadd, betad, rhodold, tautildeold, thetatilde, zeta = beta, 0.0, 1.0, 0.0, 0.0, 0.0
    normA2 = alpha * alpha
    normA, condA, maxrbar, minrbar = alpha, 1.0, 0.0, 1e100
    inner1, inner2 = threshold, tol  # internal tolerances, tightened by failed checks
    checks, last, reason = 0, None, None
    k = 0
    for k in range(1, maxiter + 1):
        # bidiagonalization: beta u = A_bar v - alpha u, alpha v = A_bar^T u - beta v
        u = mv(v) - alpha * u
        beta = _norm(u)
        if beta > 0:
            u = u / beta
            v = rmv(u) - beta * v
            alpha = _norm(v)
            if alpha > 0:
                v = v / alpha
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise NonFiniteError(f"lsmr: non-finite bidiagonalization at iteration {k}")

        # rotations: Q_k turns B_k into R_k, Qbar_k turns R_k^T into Rbar_k
        rhoold = rho
        c, s, rho = _sym_ortho(alphabar, beta)
        thetanew, alphabar = s * alpha, c * alpha
        rhobarold, zetaold = rhobar, zeta
        thetabar, rhotemp = sbar * rho, cbar * rho
        cbar, sbar, rhobar = _sym_ortho(cbar * rho, thetanew)
        zeta, zetabar = cbar * zetabar, -sbar * zetabar

        hbar = h - (thetabar * rho / (rhoold * rhobarold)) * hbar
        x = x + (zeta / (rho * rhobar)) * hbar
        h = v - (thetanew / rho) * h

        # estimate ||r_bar||
        betahat, betadd = c * betadd, -s * betadd
        thetatildeold = thetatilde
        ctildeold, stildeold, rhotildeold = _sym_ortho(rhodold, thetabar)
        thetatilde, rhodold = stildeold * rhobar, ctildeold * rhobar
        betad = -stildeold * betad + ctildeold * betahat
        tautildeold = (zetaold - thetatildeold * tautildeold) / rhotildeold
        taud = (zeta - thetatilde * tautildeold) / rhodold
        normr = math.sqrt((betad - taud) ** 2 + betadd**2)

        # estimate ||A_bar||_F and cond(A_bar)
        normA2 += beta * beta
        normA = math.sqrt(normA2)
        normA2 += alpha * alpha
        maxrbar = max(maxrbar, rhobarold)
        if k > 1:
            minrbar = min(minrbar, rhobarold)
        condA = max(maxrbar, rhotemp) / min(minrbar, rhotemp)

        normar = abs(zetabar)
        history.append(normr)
        normal_history.append(normar)
        if callback is not None:
            callback(x)

        test2 = normar / (normA * normr) if normA * normr > 0 else math.inf
        test1 = normr / bnorm / (1.0 + normA * _norm(x) / bnorm)
        if normr <= inner1 or normar <= inner2 * normA * normr:
            reason = "tolerance"
        elif alpha == 0.0 or beta == 0.0:
            reason = "Krylov subspace exhausted"
        elif 1.0 + test2 <= 1.0 or 1.0 + test1 <= 1.0 or 1.0 + 1.0 / condA <= 1.0:
            reason = "machine precision reached"
        else:
            continue
        last = check(x, normA)
        checks += 1
        if last.stop or reason != "tolerance" or checks >= MAX_CHECKS or k == maxiter:
            break
        # the estimates drifted from the truth: tighten what they must meet, and go on
        inner1 = min(inner1, 0.5 * inner1 * threshold / max(last.rbar, 1e-300))
        true2 = last.normal / (normA * last.rbar) if normA * last.rbar > 0 else math.inf
        inner2 = min(inner2, 0.5 * inner2 * tol / max(true2, 1e-300))
        last, reason = None, None
    if last is None:
        last = check(x, normA)
        checks += 1

    history[-1] = last.rbar
    normal_history[-1] = last.normal
    converged = last.stop is not None
    ratio = last.normal / (normA * last.rbar) if normA * last.rbar > 0 else math.inf
    if last.stop == "compatible":
        message = (
            f"converged: ||r|| = {last.rbar:.3e} <= {threshold:.3e} (+ rounding floor {floor1:.1e})"
        )
    elif last.stop == "least_squares":
        message = (
            f"converged to a least-squares solution: ||A^T r|| = {last.normal:.3e} <= tol "
            f"||A|| ||r|| = {tol * normA * last.rbar:.3e} (+ rounding floor {last.floor2:.1e})"
        )
    else:
        why = (
            f"did not converge in {maxiter} iterations"
            if reason is None
            else f"stopped ({reason}) after {k} iterations"
            if reason != "tolerance"
            else f"the recurrence's estimates met the tolerance but the recomputed residuals "
            f"do not ({checks} checks)"
        )
        message = (
            f"{why}: ||r|| = {last.rbar:.3e} > {threshold:.3e} and ||A^T r|| / (||A|| ||r||) = "
            f"{ratio:.2e} > tol {tol:.1e}"
        )
    info = {
        "stop": last.stop,
        "true_residual": last.rbar,
        "normal_residual": last.normal,
        "norm_A": normA,
        "cond_A": condA,
        "measurable_residual": floor1,
        "measurable_normal_residual": last.floor2,
        "checks": checks,
    }
    return _finish(x, converged, k, count[0], history, normal_history, message, info, warn)


@dataclass
class _Check:
    rbar: float  # ||r_bar||, recomputed
    normal: float  # ||A_bar^T r_bar||, recomputed
    floor2: float  # the rounding floor of ``normal``
    stop: str | None  # which test it meets, if any


def _finish(x, converged, iterations, matvecs, history, normal_history, message, info, warn):
    info = {**info, "normal_residual_norms": normal_history}
    res = SolveResult(
        x=x,
        converged=converged,
        iterations=iterations,
        matvecs=matvecs,
        residual_norms=history,
        message=message,
        method="lsmr",
        info=info,
    )
    return report(res, warn)


def _validate(A, b, x0):
    if not isinstance(b, Tensor):
        raise TypeError(f"b must be a flat tensor, got {type(b).__name__}")
    if b.is_complex():
        raise TypeError(f"lsmr does not take complex systems (b has dtype {b.dtype})")
    if not b.is_floating_point():
        raise TypeError(f"b must be a floating-point tensor, got {b.dtype}")
    if b.dim() != 1:
        raise ValueError(f"b must be a flat vector of length m, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise ValueError("b has NaN or Inf entries")
    b = b.detach()
    op = aslinearoperator(A, b.numel(), dtype=b.dtype, device=b.device)
    if op.dtype.is_complex:
        raise TypeError(f"lsmr does not take complex systems (the operator is {op.dtype})")
    if op.shape[0] != b.numel():
        raise ValueError(f"the operator has shape {op.shape} but b has {b.numel()} entries")
    if op.dtype != b.dtype:
        raise TypeError(f"b has dtype {b.dtype}, the operator {op.dtype}")
    if op.device != b.device:
        raise ValueError(f"b is on {b.device}, the operator on {op.device}")
    if x0 is not None:
        x0 = check_x0(x0, (op.shape[1],), b.dtype, b.device, "a flat vector of length n")
    return op, b, x0


def _sym_ortho(a: float, b: float) -> tuple[float, float, float]:
    """A stable Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``."""
    if b == 0:
        return math.copysign(1.0, a) if a else 0.0, 0.0, abs(a)
    if a == 0:
        return 0.0, math.copysign(1.0, b), abs(b)
    if abs(b) > abs(a):
        tau = a / b
        s = math.copysign(1.0, b) / math.sqrt(1 + tau * tau)
        return s * tau, s, b / s
    tau = b / a
    c = math.copysign(1.0, a) / math.sqrt(1 + tau * tau)
    return c, c * tau, a / c
