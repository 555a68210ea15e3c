"""MINRES for symmetric (possibly indefinite) systems."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._errors import NonFiniteError
from ._result import (
    MAX_CHECKS,
    STAGNATION_GAIN,
    Problem,
    SolveResult,
    _norm,
    as_preconditioner,
    by_columns,
    callbacks,
    check_true_residual,
    inner,
    preconditioner_hint,
    report,
    stopping_threshold,
)

__all__ = ["minres"]

SINGULAR = 10.0  # gamma <= 10 eps ||T_k||: the Lanczos matrix is singular in its last direction


def _inconsistent(k: int, r: float, threshold: float) -> str:
    return (
        f"the system looks singular and inconsistent (b is not in the range of A): at "
        f"iteration {k} the Krylov space reached a null direction of A (gamma ~ 0); returned "
        f"the least-squares iterate before it, true ||r|| = {r:.3e} > {threshold:.3e}. Use "
        "lsmr or method='dense' for the minimum-norm least-squares solution, or damping > 0"
    )


def _m_norm(r: torch.Tensor, y: torch.Tensor, Minv) -> float:
    r""":math:`\sqrt{r^\top M r}` with ``y = M r``; a negative value is M's fault."""
    sq = float(inner(r, y))
    if sq < 0:
        raise ValueError(
            "the preconditioner M is not positive definite (r^T M r < 0)"
            + preconditioner_hint(Minv)
        )
    return math.sqrt(sq)


def minres(
    A,
    b,
    *,
    x0=None,
    damping: float = 0.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    M=None,
    callback: Callable | None = None,
    recurrence_dtype: torch.dtype | None = None,
    reorthogonalize: bool = False,
    check_residual: bool = True,
    warn: bool = True,
) -> SolveResult:
    r"""Solve a symmetric, possibly indefinite system :math:`(A + \lambda I) x = b` by MINRES.

    MINRES (Paige & Saunders, 1975) minimizes :math:`\|b - A x_k\|` over the Krylov
    space; it needs symmetry but not definiteness, so it solves Hessian systems
    away from a minimum, where CG fails.

    Stopping rule: :math:`\|r_k\| \le \max(\mathrm{tol}\,\|b\|, \mathrm{atol})`. With
    ``check_residual`` (default) the true residual is computed when the recurrence's
    estimate meets the tolerance (one product); if the truth misses it, the iteration goes
    on with a tightened internal threshold (at most three such checks), and ``converged``
    always reflects a true residual (of the returned ``x``, in float64 arithmetic), so a
    loss of orthogonality cannot pass as convergence. When a second check does not halve
    the best true residual seen, MINRES has stagnated at what the dtype allows: it stops,
    returns the best iterate and says so (``info["stagnated"]``).

    ``b = 0`` returns ``x = 0`` at once. Complex Hermitian systems are solved in complex
    arithmetic (``recurrence_dtype=torch.float64`` then means complex128). An operator
    that declares ``symmetric=False`` is refused (``ValueError``). A matrix of right-hand
    sides (``n x k``) is solved one column after another; ``info["converged_columns"]``
    says which converged.

    Precision: in float32 the Lanczos vectors lose orthogonality and the estimate
    drifts from the truth. ``recurrence_dtype=torch.float64`` keeps every vector
    and scalar of the recurrence in float64 while products stay in the operator's
    dtype; ``reorthogonalize=True`` also keeps all Lanczos vectors (memory ``n x k``)
    and re-orthogonalizes against them (no preconditioner then).

    Args:
        A: a symmetric operator, dense tensor or callable.
        b: right-hand side, flat or parameter-shaped tensors.
        x0: starting point (default zero).
        damping: :math:`\lambda`; a negative value is a shift :math:`A - |\lambda| I`
            (SciPy's ``shift``, which SciPy also lists right after ``x0``), which MINRES
            solves like any symmetric system.
        tol: relative tolerance.
        atol: absolute tolerance.
        maxiter: iteration limit (default ``5 n``).
        M: symmetric positive-definite preconditioner approximating :math:`A^{-1}`.
        callback: called with the iterate after each iteration.
        recurrence_dtype: dtype of the recurrences (default: the operator's).
        reorthogonalize: full re-orthogonalization of the Lanczos vectors.
        check_residual: compute the true residual at the end (always with a
            preconditioner ``M``, whose recurrence estimates another norm).
        warn: warn when not converged.

    Returns:
        A :class:`~second.SolveResult`; ``negative_curvature`` records whether a Lanczos
        vector with :math:`v^\top A v < 0` was met (the operator is indefinite), which
        MINRES handles.

    Example:
        >>> A = torch.diag(torch.tensor([-3.0, -1.0, 2.0], dtype=torch.float64))
        >>> res = minres(A, torch.ones(3, dtype=torch.float64), tol=1e-12)
        >>> res.x
        tensor([-0.3333, -1.0000,  0.5000], dtype=torch.float64)
        >>> res.negative_curvature  # v^T A v < 0 was met: A is indefinite, MINRES does not mind
        True

    References:
        C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of linear
        equations", SIAM J. Numer. Anal. 12 (1975).
    """
    pb = Problem(A, b, x0, damping, method="minres", allow_block=True)
    if pb.block:
        return by_columns(
            minres,
            pb,
            warn,
            tol=tol,
            atol=atol,
            maxiter=maxiter,
            M=M,
            callback=callback,
            recurrence_dtype=recurrence_dtype,
            reorthogonalize=reorthogonalize,
            check_residual=check_residual,
        )
    op, n, b0 = pb.A, pb.n, pb.vector
    odt = b0.dtype
    work = recurrence_dtype or odt
    if odt.is_complex and not work.is_complex:
        work = torch.complex128 if work == torch.float64 else odt
    Minv = as_preconditioner(M, n, odt, b0.device)
    if reorthogonalize and Minv is not None:
        raise ValueError("reorthogonalize=True is not supported together with a preconditioner")
    maxiter = 5 * n if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")

    def matvec(v):
        return (op @ v.to(odt)).to(work)

    def precond(v):
        return v if Minv is None else (Minv @ v.to(odt)).to(work)

    if Minv is not None:
        # with a preconditioner the recurrence estimates sqrt(r^T M r), not ||r||: compared
        # with the 2-norm threshold it claimed convergence 100x short of it (M = 1e-4 I,
        # check_residual=False), so the true residual decides
        check_residual = True
    b = b0.to(work)
    bnorm = _norm(b)
    threshold = stopping_threshold(bnorm, tol, atol)
    if bnorm == 0.0:
        return pb.result(
            torch.zeros_like(b0),
            converged=True,
            iterations=0,
            residual_norms=[0.0],
            message="b = 0: x = 0",
            method="minres",
        )
    x = torch.zeros_like(b) if pb.x0 is None else pb.x0.to(work).clone()
    r1 = b.clone() if pb.x0 is None else b - matvec(x)
    y = precond(r1)
    beta1 = _m_norm(r1, y, Minv)
    history = [_norm(r1)]
    if history[0] <= threshold:
        return pb.result(
            x,
            converged=True,
            iterations=0,
            residual_norms=history,
            message="x0 already satisfies the tolerance",
            method="minres",
        )

    eps = torch.finfo(torch.empty(0, dtype=work).real.dtype).eps
    oldb, beta, dbar, epsln, phibar = 0.0, beta1, 0.0, 0.0, beta1
    cs, sn = -1.0, 0.0
    tnorm2 = 0.0
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    r2 = r1.clone()
    basis: list[torch.Tensor] | None = [] if reorthogonalize else None
    inner_threshold, checks, last_check = threshold, 0, None
    best: tuple[float, torch.Tensor] | None = None  # (true residual, iterate) at a check
    last_estimate = None  # the estimate at the last failed check
    neg_it = singular_it = None
    converged = stagnated = False
    stop_msg = ""
    k = 0
    for k in range(1, maxiter + 1):
        v = y / beta
        if basis is not None:
            basis.append(v)
        y = matvec(v)
        if k >= 2:
            y = y - (beta / oldb) * r1
        alfa = float(inner(v, y))
        if not math.isfinite(alfa):
            raise NonFiniteError(f"minres: the product A v is not finite at iteration {k}")
        if alfa < 0 and neg_it is None:
            neg_it = k
        y = y - (alfa / beta) * r2
        if basis is not None:
            Q = torch.stack(basis, dim=1)
            for _ in range(2):
                y = y - Q @ (Q.mH @ y)
        r1 = r2
        r2 = y
        y = precond(r2)
        oldb = beta
        beta = _m_norm(r2, y, Minv)
        tnorm2 += alfa * alfa + oldb * oldb + beta * beta
        # apply the previous rotation, then make a new one
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = math.hypot(gbar, beta)
        if gamma <= SINGULAR * eps * math.sqrt(tnorm2):
            # T_k is singular: the Krylov space has reached a null direction of A (with
            # beta ~ 0 it is invariant), which no step can use. x_{k-1} is the minimum
            # residual over it, a least-squares solution; the step would divide by ~0
            singular_it = k
            stop_msg = "singular"
            break
        gamma = max(gamma, eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        rnorm = phibar  # with a preconditioner this estimates the M^-1-norm of the residual
        history.append(float(rnorm))
        callbacks(callback, x, pb)
        due = rnorm <= inner_threshold
        # after a failed check, look again once the estimate has fallen tenfold: a truth that
        # stays put while the estimate falls is stagnation (float32 below its floor)
        recheck = last_estimate is not None and rnorm <= 0.1 * last_estimate
        if due or recheck:
            if check_residual and checks < MAX_CHECKS and k < maxiter:
                # the estimate drifts from the truth in finite precision: look before stopping
                last_check = check_true_residual(op, b, x, threshold)
                checks += 1
                if not last_check[2]:
                    if best is not None and last_check[0] > STAGNATION_GAIN * best[0]:
                        stagnated = True
                    if best is None or last_check[0] < best[0]:
                        best = (last_check[0], x.clone())
                    if stagnated:
                        break
                    inner_threshold = min(inner_threshold, rnorm * 0.5 * threshold / last_check[0])
                    last_estimate = rnorm
                    last_check = None
                    continue
                converged = True
                stop_msg = f"converged: ||r|| ~ {rnorm:.3e} <= {threshold:.3e}"
                break
            if due:
                converged = True
                stop_msg = f"converged: ||r|| ~ {rnorm:.3e} <= {threshold:.3e}"
                break
        anorm = math.sqrt(tnorm2)
        if beta <= eps * anorm:
            # invariant Krylov subspace found: x is the exact minimum-residual solution there
            stop_msg = "Krylov subspace exhausted (beta ~ 0)"
            converged = rnorm <= threshold
            break
    else:
        stop_msg = (
            f"did not converge in {maxiter} iterations: ||r|| ~ {history[-1]:.3e} > {threshold:.3e}"
        )

    info: dict = {}
    estimate = history[-1]
    if check_residual:
        # reuse the in-loop check when it was made on the final iterate
        true_r, floor, ok = last_check or check_true_residual(op, b, x, threshold)
        if not ok and best is not None and not stagnated and singular_it is None:
            # the iteration ran out after a failed check: stagnated unless it halved the best
            stagnated = true_r > STAGNATION_GAIN * best[0]
        if not ok and best is not None and best[0] < true_r:
            true_r, x = best[0], best[1]
        info.update(true_residual=true_r, measurable_residual=floor)
        history[-1] = true_r
        if singular_it is not None:
            converged = ok
            stop_msg = (
                f"converged: true ||r|| = {true_r:.3e} <= {threshold:.3e} (the Krylov space is "
                "exhausted)"
                if ok
                else _inconsistent(singular_it, true_r, threshold)
            )
        elif stagnated:
            converged = False
            stop_msg = (
                f"stagnated at relative residual {true_r / bnorm:.2e} (tolerance "
                f"{threshold / bnorm:.1e}): the recurrence has lost orthogonality in "
                f"{str(work).replace('torch.', '')}; returned the best iterate seen (try "
                "recurrence_dtype=torch.float64, reorthogonalize=True, or float64 products)"
            )
        elif not ok:
            if converged:
                stop_msg = (
                    f"the recurrence reached the tolerance but the true residual is "
                    f"{true_r:.3e} > {threshold:.3e} (+ rounding floor {floor:.1e}; loss of "
                    "orthogonality: try recurrence_dtype=torch.float64 or reorthogonalize=True)"
                )
            elif k == maxiter and stop_msg.startswith("did not converge"):
                stop_msg = (
                    f"did not converge in {maxiter} iterations: true ||r|| = {true_r:.3e} > "
                    f"{threshold:.3e}"
                )
                if not 0.5 * true_r <= estimate <= 2 * true_r:
                    stop_msg += (
                        f" (the recurrence's estimate {estimate:.3e} has drifted from it: "
                        "the system may be singular and inconsistent (lsmr or dense give a "
                        "least-squares solution), or the Lanczos vectors lost orthogonality "
                        "(recurrence_dtype=torch.float64, reorthogonalize=True))"
                    )
            converged = False
        elif not converged:
            converged = True
            stop_msg = (
                f"converged: true ||r|| = {true_r:.3e} <= {threshold:.3e} "
                f"(+ rounding floor {floor:.1e})"
            )
    if singular_it is not None and not check_residual:
        converged = estimate <= threshold
        stop_msg = (
            f"converged: ||r|| ~ {estimate:.3e} <= {threshold:.3e}"
            if converged
            else _inconsistent(singular_it, estimate, threshold)
        )
    if not converged:
        stop_msg += preconditioner_hint(Minv)
    info["stagnated"] = stagnated
    info["inconsistent"] = singular_it is not None and not converged
    if neg_it is not None:
        stop_msg += f"; the operator is indefinite (v^T A v < 0 at iteration {neg_it})"
    info["warn_negative"] = False
    res = pb.result(
        x,
        converged=converged,
        iterations=k if singular_it is None else k - 1,
        residual_norms=history,
        negative_curvature=neg_it is not None,
        negative_curvature_iteration=neg_it,
        message=stop_msg,
        method="minres",
        info=info,
    )
    return report(res, warn)
