"""Preconditioned conjugate gradient that reports non-positive curvature."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .._errors import NonFiniteError
from ._result import (
    MAX_CHECKS,
    STAGNATION_GAIN,
    Problem,
    SolveResult,
    as_preconditioner,
    column_norms,
    inner,
    measurable_residual,
    preconditioner_hint,
    real_dtype,
    report,
    stopping_threshold,
    true_residual_norms,
)

__all__ = ["cg"]

STAGNATION_WINDOW = 100  # iterations without a 1% gain in the best residual: stagnated

# how a column's solve ended
ACTIVE, CONVERGED, NEGATIVE, STAGNATED, MISSED, LIMIT, SINGULAR = range(7)

# p^T A p <= 0 with |p^T A p| <= 100 eps ||A|| ||p||^2 is a null direction to rounding (a
# singular semidefinite operator, b off its range), not negative curvature
SINGULAR_CURVATURE = 100.0


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
    the true residual of the returned ``x`` is computed when the recursive one meets the
    tolerance (one product, float64 arithmetic); if it misses by more than the floor at
    which a residual can be measured in the operator's dtype (``20 eps ||b||``), CG
    restarts from the true residual (residual replacement). ``converged=True`` always
    means a true residual within ``max(tol ||b||, atol) + 20 eps ||b||``.

    Stagnation: when a replacement does not halve the best true residual seen, or the best
    residual has not improved by 1% in 100 iterations, the iteration has reached what the
    dtype allows (in float32: about ``eps * cond(A)``). CG then stops, returns the best
    iterate seen and says ``stagnated at relative residual r`` (``converged=False``,
    ``info["stagnated"]=True``).

    ``b = 0`` returns ``x = 0`` at once. Complex Hermitian positive-definite systems are
    solved in complex arithmetic. A matrix of right-hand sides ``b`` (``n x k``) is solved
    column by column in lock step: one batched product ``A P`` per iteration; ``x`` is
    ``n x k``, ``converged`` means every column converged, and ``info`` holds
    ``converged_columns`` and ``residual_norms_columns``.

    CG needs a symmetric positive-definite operator; one that declares ``symmetric=False``
    is refused (``ValueError``). When it meets a direction
    with :math:`p^\top A p \le 0` it stops *before* stepping along it, returns the
    last iterate with ``negative_curvature=True`` and ``converged=False``, and warns
    (:class:`~second.NegativeCurvatureWarning`). Use :func:`minres` for indefinite
    systems such as the Hessian away from a minimum. A :math:`p^\top A p` that is zero to
    rounding (:math:`|p^\top A p| \le 100\,\varepsilon \|A\| \|p\|^2`) is a null
    direction of a singular semidefinite operator (``b`` is then not in its range): the
    message says so and suggests ``lsmr`` or ``dense``, and the iterate of least residual
    seen is returned. Norms and inner products accumulate in float64 whatever the dtype, so
    a small but normal float32 ``b`` (``1e-20``) keeps ``tol`` relative.

    Args:
        A: a :class:`~second.LinearOperator`, a dense tensor, or a callable matvec.
        b: right-hand side, flat or a sequence of parameter-shaped tensors.
        x0: starting point (default zero).
        tol: relative tolerance.
        atol: absolute tolerance.
        maxiter: iteration limit (default ``10 n``).
        M: preconditioner approximating :math:`A^{-1}` (operator, tensor or callable).
        callback: called with the iterate after every iteration.
        damping: :math:`\lambda` (a negative value shifts; CG reports the non-positive
            curvature it may cause).
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
    pb = Problem(A, b, x0, damping, method="cg", allow_block=True)
    op, n, B = pb.A, pb.n, pb.B
    k = B.shape[1]
    Minv = as_preconditioner(M, n, pb.dtype, pb.B.device)
    maxiter = 10 * n if maxiter is None else int(maxiter)
    if maxiter < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    bnorm = column_norms(B)
    thr = torch.tensor(
        [stopping_threshold(float(v), tol, atol) for v in bnorm], dtype=torch.float64
    )
    floor = torch.tensor(
        [measurable_residual(op.dtype, float(v)) for v in bnorm], dtype=torch.float64
    )

    def apply(V):  # one product per column; a single column goes through the vector path
        return (op @ V[:, 0]).unsqueeze(1) if V.shape[1] == 1 else op @ V

    def precond(R):
        if Minv is None:
            return R
        Z = (Minv @ R[:, 0]).unsqueeze(1) if R.shape[1] == 1 else Minv @ R
        if bool((inner(R, Z) <= 0).any()):
            raise ValueError(
                "the preconditioner M is not positive definite (r^T M r <= 0)"
                + preconditioner_hint(Minv)
            )
        return Z

    status = torch.full((k,), ACTIVE, dtype=torch.long)
    zero_b = bnorm == 0
    X = torch.zeros_like(B) if pb.x0 is None else pb.x0.reshape(B.shape).clone()
    X[:, zero_b] = 0  # b = 0: x = 0 is exact, whatever x0 says
    status[zero_b] = CONVERGED
    R = B.clone()
    if pb.x0 is not None and not bool(zero_b.all()):
        live = (~zero_b).nonzero().flatten()
        R[:, live] = B[:, live] - apply(X[:, live])
    rn = column_norms(R)
    status[(rn <= thr) & (status == ACTIVE)] = CONVERGED  # x0 already satisfies the rule
    true_r = torch.where(status == CONVERGED, rn, torch.full_like(rn, math.nan))
    history = [float(rn.max())]
    columns_history = [rn.tolist()]
    Z = precond(R)
    P = Z.clone()
    rz = inner(R, Z)
    best_r, best_X = rn.clone(), X.clone()
    mark_r, mark_it = rn.clone(), torch.zeros(k, dtype=torch.long)
    checks = torch.zeros(k, dtype=torch.long)
    neg_it: list[int | None] = [None] * k
    eps = torch.finfo(real_dtype(op.dtype)).eps
    curvature_scale = 0.0  # the largest Rayleigh quotient p^T A p / ||p||^2 seen: ~ ||A||
    it = 0
    while bool((status == ACTIVE).any()) and it < maxiter:
        it += 1
        act = (status == ACTIVE).nonzero().flatten()
        AP = apply(P[:, act])
        pAp = inner(P[:, act], AP)
        if not bool(torch.isfinite(pAp).all()):
            raise NonFiniteError(f"cg: the product A p is not finite at iteration {it}")
        pp = column_norms(P[:, act]) ** 2
        null = pAp.abs() <= SINGULAR_CURVATURE * eps * curvature_scale * pp
        for j, zero in zip(act[pAp <= 0].tolist(), null[pAp <= 0].tolist()):
            # stop before stepping along it
            status[j], neg_it[j] = (SINGULAR if zero else NEGATIVE), it
        curvature_scale = max(curvature_scale, float((pAp / pp.clamp_min(1e-300)).max()))
        keep = pAp > 0
        a, AP, pAp = act[keep], AP[:, keep], pAp[keep]
        if a.numel() == 0:
            break
        alpha = (rz[a] / pAp).to(B.dtype)
        X[:, a] += alpha * P[:, a]
        R[:, a] -= alpha * AP
        rn[a] = column_norms(R[:, a])
        better = a[rn[a] < best_r[a]]
        best_r[better], best_X[:, better] = rn[better], X[:, better]
        gain = a[rn[a] < 0.99 * mark_r[a]]
        mark_r[gain], mark_it[gain] = rn[gain], it
        if callback is not None:
            callback(pb.unflatten(X[:, 0]) if not pb.block else X)
        restart = torch.zeros(k, dtype=torch.bool)
        met = a[rn[a] <= thr[a]]
        if met.numel() and check_residual:
            tr = true_residual_norms(op, B[:, met], X[:, met])
            ok = tr <= thr[met] + floor[met]
            true_r[met[ok]] = tr[ok]
            status[met[ok]] = CONVERGED
            for j, t in zip(met[~ok].tolist(), tr[~ok].tolist()):
                checks[j] += 1
                # the recursive residuals were optimistic: judge by the true one from here
                stalled = checks[j] > 1 and t > STAGNATION_GAIN * float(best_r[j])
                if t < best_r[j] or checks[j] == 1:
                    best_r[j], best_X[:, j] = t, X[:, j]
                true_r[j] = t
                if stalled:
                    status[j] = STAGNATED
                elif checks[j] > MAX_CHECKS:
                    status[j] = MISSED
                else:  # residual replacement, and a restart (beta = 0) from it
                    R[:, j] = B[:, j] - apply(X[:, j : j + 1])[:, 0]
                    rn[j] = t
                    mark_r[j], mark_it[j] = t, it
                    restart[j] = True
        elif met.numel():
            status[met] = CONVERGED
        status[(status == ACTIVE) & (it - mark_it >= STAGNATION_WINDOW)] = STAGNATED
        history.append(float(rn.max()))
        columns_history.append(rn.tolist())
        a = (status == ACTIVE).nonzero().flatten()
        if a.numel() == 0:
            break
        Z = precond(R[:, a])
        rz_new = inner(R[:, a], Z)
        beta = torch.where(restart[a], torch.zeros_like(rz_new), rz_new / rz[a]).to(B.dtype)
        rz[a] = rz_new
        P[:, a] = Z + beta * P[:, a]
    status[status == ACTIVE] = LIMIT
    track = _Track(X, best_X, best_r, rn, true_r, thr, floor, status, neg_it)
    hint = preconditioner_hint(Minv)
    return _finish(pb, op, track, it, history, columns_history, check_residual, maxiter, warn, hint)


@dataclass
class _Track:
    """Per-column state at the end of a CG run (columns of ``X`` are right-hand sides)."""

    X: torch.Tensor
    best_X: torch.Tensor
    best_r: torch.Tensor
    rn: torch.Tensor
    true_r: torch.Tensor
    thr: torch.Tensor
    floor: torch.Tensor
    status: torch.Tensor
    neg_it: list


def _finish(
    pb, op, t: _Track, it, history, columns_history, check_residual, maxiter, warn, hint=""
) -> SolveResult:
    """Assemble the result: the best iterate for columns that stagnated or ran out."""
    X, best_X, best_r, rn, true_r = t.X, t.best_X, t.best_r, t.rn, t.true_r
    thr, floor, status, neg_it = t.thr, t.floor, t.status, t.neg_it
    k = X.shape[1]
    fallback = (status == STAGNATED) | (status == MISSED) | (status == LIMIT) | (status == SINGULAR)
    use_best = fallback & (best_r < rn)
    X = torch.where(use_best.unsqueeze(0), best_X, X)
    # the residual reported is that of the x returned
    todo = (fallback & (use_best | torch.isnan(true_r))) | (
        (status == NEGATIVE) & torch.isnan(true_r)
    )
    if check_residual and bool(todo.any()):
        idx = todo.nonzero().flatten()
        true_r[idx] = true_residual_norms(op, pb.B[:, idx], X[:, idx])
    bnorm = column_norms(pb.B)
    messages = []
    reported = []
    for j in range(k):
        r = float(true_r[j]) if not math.isnan(float(true_r[j])) else float(min(rn[j], best_r[j]))
        reported.append(r)
        rel = r / float(bnorm[j]) if bnorm[j] > 0 else 0.0
        s = int(status[j])
        if s == CONVERGED:
            messages.append(
                "b = 0: x = 0"
                if bnorm[j] == 0
                else f"converged: ||r|| = {r:.3e} <= {float(thr[j]):.3e}"
            )
        elif s == NEGATIVE:
            messages.append(
                f"non-positive curvature p^T A p <= 0 at iteration {neg_it[j]}: the operator is "
                "not positive definite; stopped before stepping along it (use minres, damping, "
                "or the Gauss-Newton matrix)"
            )
        elif s == SINGULAR:
            messages.append(
                f"p^T A p ~ 0 at iteration {neg_it[j]} (|p^T A p| <= {SINGULAR_CURVATURE:g} eps "
                "||A|| ||p||^2): a null direction of the operator, which is singular there "
                "rather than negative definite, so b is not in its range (an inconsistent "
                f"system), ||r|| = {r:.3e} > {float(thr[j]):.3e}; returned the iterate of least "
                "residual seen (use lsmr or method='dense' for a least-squares solution, or "
                "damping > 0)"
            )
        elif s in (STAGNATED, MISSED):
            messages.append(
                f"stagnated at relative residual {rel:.2e} (tolerance {float(thr[j]) / max(float(bnorm[j]), 1e-300):.1e}): "
                f"the {str(pb.dtype).replace('torch.', '')} floor for this operator, about eps * cond(A); "
                "returned the best iterate seen (use float64 products, a preconditioner, or a "
                "looser tol)"
            )
        else:
            messages.append(
                f"did not converge in {maxiter} iterations: ||r|| = {r:.3e} > {float(thr[j]):.3e}"
            )
    converged_cols = (status == CONVERGED).tolist()
    if bool(use_best.any()):  # the residual of the x returned, not of the last iterate
        history[-1] = max(reported)
    info: dict = {}
    if check_residual:
        info["true_residual"] = true_r.tolist() if pb.block else float(true_r[0])
        info["measurable_residual"] = floor.tolist() if pb.block else float(floor[0])
    info["stagnated"] = bool(((status == STAGNATED) | (status == MISSED)).any())
    negs = [i for i in neg_it if i is not None]
    if pb.block:
        info.update(
            converged_columns=converged_cols,
            messages=messages,
            residual_norms_columns=columns_history,
        )
        n_conv = sum(converged_cols)
        message = f"{n_conv} of {k} columns converged" + (
            ""
            if n_conv == k
            else "; "
            + "; ".join(
                f"column {j}: {m}" for j, m in enumerate(messages) if not converged_cols[j]
            )[:2000]
        )
    else:
        message = messages[0]
    if not all(converged_cols):
        message += hint
    res = pb.result(
        X if pb.block else X[:, 0],
        converged=all(converged_cols),
        iterations=it,
        residual_norms=history,
        negative_curvature=bool(negs),
        negative_curvature_iteration=min(negs) if negs else None,
        message=message,
        method="cg",
        info=info,
    )
    return report(res, warn)
