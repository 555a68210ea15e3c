r"""Truncated Neumann series and its stochastic version, LiSSA.

Both rest on :math:`A^{-1} = \frac1s \sum_{i \ge 0} (I - A/s)^i`, which converges iff
the spectrum of :math:`A/s` lies in :math:`(0, 2)`: :math:`A` positive definite and
:math:`s > \lambda_{\max}/2`. The error after :math:`K` terms shrinks like
:math:`q^K` with contraction :math:`q = \max(|1 - \lambda_{\min}/s|, |1 - \lambda_{\max}/s|)`.
An indefinite operator has :math:`q > 1`: the series diverges and no scale fixes it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._errors import ConvergenceWarning, SecondDeprecationWarning
from ..operators.base import LinearOperator, aslinearoperator
from ..spectral.lanczos import extreme_eigenvalues
from ._result import (
    Problem,
    SolveResult,
    column_norms,
    report,
    stopping_threshold,
)

__all__ = ["neumann_solve", "neumann", "lissa", "lissa_recursion", "LissaRecursion"]


def _auto_scale(op, steps: int, generator) -> tuple[float, float, float]:
    lo, hi = extreme_eigenvalues(op, steps=steps, generator=generator)
    # Ritz values lie inside the spectrum; a 5% margin keeps lambda_max / s < 2 safely
    return 1.05 * hi, lo, hi


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
    ``divergence_factor * ||b||`` stops the iteration the same way (the best iterate
    seen is returned, flagged). ``info`` holds the scale, the eigenvalue estimates and
    the predicted contraction.

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
        return res if converged else report(res, warn, stacklevel=4)

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
            info["warn_negative"] = True
            return finish(
                out(best_P),
                k,
                f"diverged: ||r|| grew to {float(rn.max()):.3e} (from {float(bnorm.max()):.3e}); "
                "the operator has an eigenvalue outside (0, 2 s): it is indefinite or the scale "
                "is too small. Returned the best iterate",
                diverged=True,
                negative_curvature=True,
            )
        if k == maxiter:
            break
        P = B + P - AP / scale  # p_{k+1} = b + (I - A/s) p_k
        if callback is not None:
            callback(out(P) if pb.block else pb.unflatten(P[:, 0] / scale))
    if pb.block:
        info["converged_columns"] = (best_r <= thr).tolist()
    return finish(
        out(best_P),
        maxiter,
        f"did not converge in {maxiter} terms: ||r|| = {float(best_r.max()):.3e} > "
        f"{float(thr.max()):.3e} (contraction ~ {info.get('contraction', float('nan')):.4f} "
        "per term)",
    )


def neumann(A, b, **options) -> SolveResult:
    """Deprecated spelling of :func:`neumann_solve` (removed in 0.3)."""
    warnings.warn(
        "second.solvers.neumann is deprecated and will be removed in 0.3: use "
        "second.neumann_solve (the same solver; second.neumann is the seed's functional form)",
        SecondDeprecationWarning,
        stacklevel=2,
    )
    return neumann_solve(A, b, **options)


def _batch_operators(A) -> Callable[[int], LinearOperator]:
    """A function ``i -> operator of mini-batch i`` for LiSSA's stochastic products."""
    from ..data import iterate_batches
    from ..operators.curvature import CurvatureOperator

    if isinstance(A, CurvatureOperator):
        if A.single_batch:
            return lambda i: A
        # the same operator (kind and options: a Fisher's samples, columns, ...) on each batch
        batches = list(iterate_batches(A.data, A.task, A.device))
        ops: list[LinearOperator | None] = [None] * len(batches)

        def get(i: int) -> LinearOperator:
            j = i % len(batches)
            op_j = ops[j]
            if op_j is None:
                op_j = ops[j] = A.restrict(batches[j])
            return op_j

        return get
    if isinstance(A, (list, tuple)):
        listed = [aslinearoperator(a) for a in A]
        return lambda i: listed[i % len(listed)]
    if callable(A) and not isinstance(A, (LinearOperator, Tensor)):
        return A
    op = aslinearoperator(A)
    return lambda i: op


@dataclass
class LissaRecursion:
    r"""What :func:`lissa_recursion` returns.

    Attributes:
        x: the averaged estimate :math:`\frac{1}{R}\sum_r p^{(r)}_d / s` (``None`` when the
            recursion diverged).
        products: curvature products made.
        diverged: ``(j, ||p_j||)`` at the first term that broke the guard or was not finite
            (``None`` when none did).
    """

    x: Tensor | None
    products: int
    diverged: tuple[int, float] | None = None


def lissa_recursion(
    b: Tensor,
    product: Callable[[Tensor], Tensor],
    *,
    depth: int,
    scale: float,
    damping: float = 0.0,
    repeats: int = 1,
    bound: Callable[[int], float] | None = None,
    tick: Callable[[], object] | None = None,
) -> LissaRecursion:
    r"""LiSSA's stochastic Neumann recursion, the one implementation of it.

    .. math:: p_0 = b, \qquad p_{j+1} = b + \Big(I - \frac{A_{i_j} + \lambda I}{s}\Big) p_j,
              \qquad x = \frac1R \sum_{r=1}^{R} p^{(r)}_{\mathrm{depth}} / s,

    where each call of ``product`` applies a freshly sampled curvature :math:`A_{i_j}`.
    :func:`lissa` (the solver) and :class:`second.optim.LiSSA` (the optimizer) both run it.

    Args:
        b: the right-hand side (flat).
        product: ``p -> A_i p`` for a fresh sample ``i`` on every call.
        depth: terms per estimate.
        scale: :math:`s`.
        damping: :math:`\lambda \ge 0`.
        repeats: independent estimates averaged.
        bound: ``j -> largest admissible ||p_j||`` (a divergence guard; default none: only
            non-finite terms stop the recursion).
        tick: called once per product (a progress bar).

    Returns:
        A :class:`LissaRecursion`.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> r = lissa_recursion(torch.ones(2, dtype=torch.float64), lambda p: A @ p, depth=200, scale=2.5)
        >>> torch.allclose(r.x, torch.tensor([1.0, 0.5], dtype=torch.float64)), r.products
        (True, 200)
    """
    acc = torch.zeros_like(b)
    products = 0
    for _ in range(repeats):
        p = b.clone()
        for j in range(depth):
            if tick is not None:
                tick()
            Ap = product(p)
            products += 1
            if damping:
                Ap = Ap + damping * p
            p = b + p - Ap / scale
            norm = float(torch.linalg.vector_norm(p))
            limit = math.inf if bound is None else bound(j + 1)
            if not norm <= limit:  # also catches a non-finite term
                return LissaRecursion(None, products, (j + 1, norm))
        acc += p / scale
    return LissaRecursion(acc / repeats, products)


def lissa(
    A: LinearOperator | Sequence[LinearOperator] | Callable[[int], LinearOperator],
    b,
    *,
    depth: int | None = None,
    repeats: int = 1,
    scale: float | None = None,
    damping: float = 0.0,
    tol: float = 1e-3,
    full_operator: LinearOperator | None = None,
    lanczos_steps: int = 20,
    bias_warning: float = 0.05,
    max_depth: int = 100_000,
    scale_batches: int = 4,
    generator: torch.Generator | None = None,
    progressbar: bool | None = None,
    warn: bool = True,
) -> SolveResult:
    r"""LiSSA: a stochastic Neumann series over mini-batch curvature (Agarwal et al., 2016).

    Recursion, repeated ``repeats`` times with fresh mini-batches and averaged:
    :math:`p_0 = b,\ p_{j+1} = b + (I - (A_{i_j} + \lambda I)/s)\, p_j`, :math:`x = p_{d}/s`,
    where :math:`A_{i_j}` is the curvature of a random mini-batch.

    ``A`` is a :class:`~second.CurvatureOperator` over an iterable of batches (one
    operator per batch is built), a list of operators, or a function ``i -> operator``.

    ``scale=None`` takes :math:`s = 1.05 \max(\lambda_{\max}(A), \max_i \lambda_{\max}(A_i)) +
    \lambda` over the full operator and the first ``scale_batches`` mini-batch operators
    (Lanczos estimates): a mini-batch with curvature above :math:`2s` would make the
    recursion expand.

    Truncation bias: after ``depth`` terms the deterministic part of the error is
    :math:`\|(I - (A+\lambda I)/s)^{d} A^{-1} b\|`, up to :math:`q^d` relative with
    :math:`q = 1 - (\lambda_{\min} + \lambda)/s`. Scale and contraction are estimated by
    Lanczos on ``full_operator`` (default: ``A`` itself when it is one operator, else the
    first batch's). ``depth=None`` chooses :math:`d = \lceil \ln(\mathrm{tol}) / \ln q \rceil`
    (capped at ``max_depth``); a fixed depth that leaves :math:`q^d >` ``bias_warning``
    warns (:class:`~second.ConvergenceWarning`): this is the silent failure where
    LiSSA at default settings returns a fraction of the true magnitude.

    ``converged`` means the predicted bias :math:`q^d \le` ``tol``; the stochastic error is
    not bounded by it (average more ``repeats``). ``info`` holds scale, contraction, depth
    and ``predicted_bias``.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> res = lissa([A], torch.ones(2, dtype=torch.float64), tol=1e-8)
        >>> torch.allclose(res.x, torch.tensor([1.0, 0.5], dtype=torch.float64))
        True
    """
    get = _batch_operators(A)
    first = get(0)
    ref = (
        full_operator
        if full_operator is not None
        else (A if isinstance(A, LinearOperator) else first)
    )
    pb = Problem(
        first, b, None, damping, method="lissa", allow_complex=False, allow_negative_damping=False
    )
    info: dict = {}
    lo, hi = extreme_eigenvalues(aslinearoperator(ref), steps=lanczos_steps, generator=generator)
    setup_matvecs = lanczos_steps
    lo_d, hi_d = lo + damping, hi + damping
    info.update(lambda_min_estimate=lo_d, lambda_max_estimate=hi_d)
    if lo_d <= 0:
        info.update(warn_negative=True)
        return report(
            pb.result(
                torch.zeros_like(pb.vector),
                converged=False,
                iterations=0,
                residual_norms=[],
                negative_curvature=True,
                diverged=True,
                method="lissa",
                info=info,
                message=(
                    f"the damped operator is not positive definite (eigenvalue ~ {lo_d:.3e}): "
                    f"LiSSA diverges; add damping >= {-lo:.3e}"
                ),
            ),
            warn,
        )
    if scale is None:
        # every mini-batch operator must contract too: bound the largest batch eigenvalue
        # (distinct operators only: a single operator was estimated above)
        distinct = {id(o): o for o in (get(i) for i in range(scale_batches))}
        distinct.pop(id(ref), None)
        batch_max = max(
            [hi]
            + [
                extreme_eigenvalues(aslinearoperator(o), steps=lanczos_steps, generator=generator)[
                    1
                ]
                for o in distinct.values()
            ]
        )
        scale = 1.05 * (batch_max + damping)
        setup_matvecs += lanczos_steps * len(distinct)
        info["batch_lambda_max_estimate"] = batch_max + damping
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    q = max(1 - lo_d / scale, abs(1 - hi_d / scale))
    if depth is None:
        depth = min(max_depth, math.ceil(math.log(max(tol, 1e-300)) / math.log(max(q, 1e-300))))
    depth = int(depth)
    bias = q**depth
    info.update(scale=float(scale), contraction=q, depth=depth, predicted_bias=bias)
    g = generator or torch.Generator(device=pb.vector.device).manual_seed(0)
    steps: Iterable[int] = range(repeats * depth)
    if progressbar is not False:
        from .._progress import progress

        steps = progress(steps, desc="lissa", unit="product", enabled=progressbar)
    it = iter(steps)

    def sample_product(p):
        return get(int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device))) @ p

    rec = lissa_recursion(
        pb.vector,
        sample_product,
        depth=depth,
        scale=scale,
        damping=damping,
        repeats=repeats,
        tick=lambda: next(it),
    )
    counter = rec.products
    if rec.x is None:
        return report(
            pb.result(
                torch.zeros_like(pb.vector),
                converged=False,
                iterations=counter,
                residual_norms=[],
                diverged=True,
                method="lissa",
                info=info,
                message="the recursion overflowed: a mini-batch curvature exceeds 2 * scale",
            ),
            warn,
        )
    x = rec.x
    converged = bias <= tol
    msg = (
        f"depth {depth}, scale {scale:.3e}, contraction {q:.6f}: predicted truncation bias "
        f"{bias:.2e}"
    )
    if bias > bias_warning:
        msg += (
            f" leaves ~{100 * bias:.0f}% of the solution's slowest component missing; "
            f"use depth >= {math.ceil(math.log(tol) / math.log(q))} or more damping"
        )
        if warn:
            warnings.warn(f"lissa: {msg}", ConvergenceWarning, stacklevel=2)
    res = pb.result(
        x,
        converged=converged,
        iterations=counter,
        residual_norms=[],
        method="lissa",
        info=info,
        message=msg,
    )
    res.matvecs = counter + setup_matvecs
    return res
