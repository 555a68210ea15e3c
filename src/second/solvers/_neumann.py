r"""The truncated Neumann series (LiSSA, its stochastic version, is in ``_lissa.py``).

It rests on :math:`A^{-1} = \frac1s \sum_{i \ge 0} (I - A/s)^i`, which converges iff
the spectrum of :math:`A/s` lies in :math:`(0, 2)`: :math:`A` positive definite and
:math:`s > \lambda_{\max}/2`. The error after :math:`K` terms shrinks like
:math:`q^K` with contraction :math:`q = \max(|1 - \lambda_{\min}/s|, |1 - \lambda_{\max}/s|)`.
An indefinite operator has :math:`q > 1`: the series diverges and no scale fixes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._deprecation import warn_deprecated
from ..spectral.lanczos import extreme_eigenvalues
from ._result import (
    Problem,
    SolveResult,
    column_norms,
    report,
    stopping_threshold,
)

__all__ = ["neumann_solve", "neumann"]


def _auto_scale(op, steps: int, generator) -> tuple[float, float, float]:
    lo, hi = extreme_eigenvalues(op, steps=steps, generator=generator)
    # Ritz values lie inside the spectrum; a 5% margin keeps lambda_max / s < 2 safely
    return 1.05 * hi, lo, hi


def _more_terms(what: str, q: float, best_r: Tensor, thr: Tensor) -> str:
    """``"<what> ~ q per term: about N more terms needed"`` for a series still converging."""
    ratio = float((best_r / thr.clamp_min(1e-300)).max())
    more = math.ceil(math.log(ratio) / -math.log(q)) if 0 < q < 1 and ratio > 1 else None
    return f"{what} ~ {q:.4f} per term" + (
        f": about {more} more terms needed" if more is not None else ""
    )


def neumann_solve(
    A,
    b,
    *,
    scale: float | None = None,
    damping: float = 0.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int = 1000,
    x0=None,
    callback: Callable | None = None,
    lanczos_steps: int = 20,
    divergence_factor: float = 1e4,
    warn: bool = True,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I) x = b` by the truncated Neumann series.

    Iteration: :math:`p_0 = b,\ p_{k+1} = b + (I - A/s) p_k`, :math:`x_k = p_k / s`.
    The residual :math:`r_k = b - A x_k = (I - A/s)^{k+1} b` comes free with each
    product, so the stopping rule is SciPy's: :math:`\|r_k\| \le \max(\mathrm{tol}\|b\|,
    \mathrm{atol})`.

    ``scale=None`` (default) estimates :math:`\lambda_{\max}` and :math:`\lambda_{\min}` by
    ``lanczos_steps`` Lanczos iterations and uses :math:`s = 1.05\,\lambda_{\max}`.
    If the estimate shows a negative eigenvalue the series cannot converge: it is
    reported at once (``negative_curvature=True``, ``diverged=True``) with ``x = 0``
    and a warning instead of iterating. A residual that grows past
    ``divergence_factor * ||b||`` stops the iteration (``diverged=True``; the best iterate
    seen is returned). ``info`` holds the scale, the eigenvalue estimates and the predicted
    contraction.

    A result that did not converge says why and warns: with a given ``scale`` the ends of
    the spectrum are then estimated (``lanczos_steps`` more products) to tell *negative
    curvature detected* (an eigenvalue < 0: ``negative_curvature=True``,
    :class:`~second.NegativeCurvatureWarning`; no scale helps) from *contraction > 1*
    (:math:`\lambda_{\max} > 2s`: the scale is too small), a residual that grows for
    another reason, and a slow contraction (more terms needed);
    :class:`~second.ConvergenceWarning` for the last three.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
        >>> res = neumann_solve(A, torch.ones(3, dtype=torch.float64), tol=1e-10)
        >>> res.converged, torch.allclose(res.x, torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
        (True, True)
    """
    pb = Problem(A, b, x0, damping, method="neumann", allow_block=True, allow_complex=False)
    op, B = pb.A, pb.B
    info: dict = {}
    history: list[float] = []

    def finish(X: Tensor, iterations: int, message: str, converged: bool = False, **flags):
        res = pb.result(
            X, converged=converged, iterations=iterations, residual_norms=history,
            method="neumann", info=info, message=message, **flags,
        )  # fmt: skip
        return res if converged else report(res, warn)

    if scale is None:
        scale, lo, hi = _auto_scale(op, lanczos_steps, None)
        info.update(lambda_min_estimate=lo, lambda_max_estimate=hi)
        if lo < -1e-8 * abs(hi):
            info.update(scale=scale, warn_negative=True)
            history.append(float(column_norms(B).max()))
            return finish(
                torch.zeros_like(B) if pb.block else torch.zeros_like(pb.vector),
                0,
                f"the operator is indefinite (Lanczos finds an eigenvalue ~ {lo:.3e} < 0): "
                "the Neumann series diverges for every scale; use minres, or damping "
                f">= {-lo:.3e}, or the Gauss-Newton matrix",
                negative_curvature=True,
                diverged=True,
            )
        info["contraction"] = max(abs(1 - lo / scale), abs(1 - hi / scale))
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if int(maxiter) < 0:
        raise ValueError(f"maxiter must be >= 0, got {maxiter}")
    info["scale"] = float(scale)
    bnorm = column_norms(B)
    thr = torch.tensor(
        [stopping_threshold(float(v), tol, atol) for v in bnorm], dtype=torch.float64
    )

    def apply(V):  # all right-hand sides in one batched product
        return (op @ V[:, 0]).unsqueeze(1) if V.shape[1] == 1 else op @ V

    def out(P):
        return P / scale if pb.block else P[:, 0] / scale

    P = B.clone() if pb.x0 is None else pb.x0.reshape(B.shape) * scale
    P[:, bnorm == 0] = 0  # b = 0: x = 0 is exact, whatever x0 says
    best_P, best_r = P.clone(), torch.full_like(bnorm, math.inf)
    diverging = False

    def why() -> tuple[str, bool]:
        """Why the series did not converge, and whether negative curvature was detected."""
        q = history[-1] / history[-2] if len(history) > 1 and history[-2] > 0 else math.nan
        info["observed_contraction"] = q
        growing = diverging or history[-1] > history[0] or q >= 1
        info["growing"] = growing
        if "contraction" not in info and not growing:  # a given scale, converging slowly
            if math.isnan(q):
                return "maxiter = 0: only the first term was taken", False
            return _more_terms("observed contraction", q, best_r, thr), False
        if "lambda_min_estimate" not in info:  # a given scale: look at the spectrum's ends
            lo, hi = extreme_eigenvalues(op, steps=lanczos_steps)
            info.update(lambda_min_estimate=lo, lambda_max_estimate=hi)
            info["contraction"] = max(abs(1 - lo / scale), abs(1 - hi / scale))
        lo, hi, q = info["lambda_min_estimate"], info["lambda_max_estimate"], info["contraction"]
        s2 = 2 * float(scale)
        if lo < -1e-8 * abs(hi):
            return (
                f"negative curvature detected (Lanczos finds an eigenvalue ~ {lo:.3e} < 0): "
                "the operator is indefinite and the Neumann series diverges for every scale; "
                f"use minres, or damping >= {-lo:.3e}, or the Gauss-Newton matrix",
                True,
            )
        if hi >= s2:
            return (
                f"contraction ~ {q:.4f} > 1: lambda_max ~ {hi:.3e} > 2 * scale = {s2:.3e}, the "
                f"scale is too small; use scale >= {1.05 * hi:.3e} (scale=None estimates it)",
                False,
            )
        if growing:
            return (
                f"the residual is growing ({history[0]:.3e} -> {history[-1]:.3e}): an "
                f"eigenvalue lies outside (0, 2 * scale) = (0, {s2:.3e}) that the Lanczos "
                f"estimates [{lo:.3e}, {hi:.3e}] miss",
                False,
            )
        return _more_terms("contraction", q, best_r, thr), False

    for k in range(maxiter + 1):
        AP = apply(P)
        R = B - AP / scale
        rn = column_norms(R)
        history.append(float(rn.max()))
        better = rn < best_r
        best_r = torch.where(better, rn, best_r)
        best_P[:, better] = P[:, better]
        if bool((rn <= thr).all()):
            message = f"converged: ||r|| = {float(rn.max()):.3e} <= {float(thr.max()):.3e}"
            return finish(out(P), k, message, converged=True)
        if not bool(torch.isfinite(rn).all()) or bool((rn > divergence_factor * bnorm).any()):
            diverging = True
            reason, negative = why()
            info["warn_negative"] = negative
            return finish(
                out(best_P),
                k,
                f"diverged: ||r|| grew to {float(rn.max()):.3e} (from {float(bnorm.max()):.3e}); "
                f"{reason}. Returned the best iterate",
                diverged=True,
                negative_curvature=negative,
            )
        if k == maxiter:
            break
        P = B + P - AP / scale  # p_{k+1} = b + (I - A/s) p_k
        if callback is not None:
            callback(out(P) if pb.block else pb.unflatten(P[:, 0] / scale))
    if pb.block:
        info["converged_columns"] = (best_r <= thr).tolist()
    reason, negative = why()
    info["warn_negative"] = negative
    return finish(
        out(best_P),
        maxiter,
        f"did not converge in {maxiter} terms: ||r|| = {float(best_r.max()):.3e} > "
        f"{float(thr.max()):.3e}; {reason}",
        negative_curvature=negative,
    )


def neumann(A, b, **options) -> SolveResult:
    """Deprecated spelling of :func:`neumann_solve` (removed in 0.3)."""
    warn_deprecated(
        "second.solvers.neumann",
        "second.neumann_solve",
        detail="the same solver; second.neumann is the seed's functional form",
    )
    return neumann_solve(A, b, **options)
