r"""Conjugate gradient as an optimizer's inner loop: quadratic-model bookkeeping and iterate saving.

Minimizes :math:`\phi(d) = g^\top d + \tfrac12 d^\top A d` (i.e. solves :math:`A d = -g`) for a
positive-definite damped curvature :math:`A`, tracking :math:`A d` through the residual so the
model value of any iterate comes free, with Martens' (2010) relative-progress stopping rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._deprecation import renamed_keyword, renamed_property
from .direction import ResidualBasis

__all__ = ["InnerCGResult", "model_cg"]


@dataclass
class InnerCGResult:
    r"""What :func:`model_cg` returns.

    Attributes:
        x: the last iterate :math:`d`.
        Ax: :math:`A d` (from the recursive residual).
        phi: :math:`\phi(d)`.
        iterations: CG iterations.
        matvecs: products with ``A`` (including one for a non-zero ``x0``; ``products`` is
            its deprecated spelling).
        saved: ``(iteration, d_i, A d_i)`` for the iterations listed in ``save_at`` and the last.
        status: ``"converged"``, ``"progress"`` (Martens' rule), ``"negative_curvature"``
            or ``"maxiter"``.
    """

    x: Tensor
    Ax: Tensor
    phi: float
    iterations: int
    matvecs: int
    saved: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    status: str = "maxiter"

    products = renamed_property("products", "matvecs")


def model_cg(
    matvec: Callable[[Tensor], Tensor],
    g: Tensor,
    *,
    x0: Tensor | None = None,
    maxiter: int = 250,
    tol: float = 1e-6,
    progress_tol: float | None = None,
    min_iter: int = 1,
    save_at: set[int] | None = None,
    reorthogonalize: bool = True,
    **deprecated,
) -> InnerCGResult:
    r"""CG on :math:`A d = -g`, stopping on the residual or on stalled model progress.

    Stopping rule: :math:`\|A d_i + g\| \le \mathrm{tol}\,\|g\|`, or (with ``progress_tol``
    :math:`=\epsilon`) Martens' rule :math:`i > k`, :math:`\phi_i < 0` and
    :math:`(\phi_i - \phi_{i-k}) / \phi_i < k\epsilon` with :math:`k = \max(10, i/10)`,
    or ``maxiter``. A direction with :math:`p^\top A p \le 0` stops the loop at the current
    iterate (status ``"negative_curvature"``).

    Args:
        matvec: ``v -> A v``.
        g: the gradient.
        x0: warm start (costs one product).
        maxiter: iteration limit.
        tol: relative residual tolerance (default 1e-6).
        progress_tol: :math:`\epsilon` for Martens' rule (``None``: off).
        min_iter: iterations before Martens' rule may stop.
        save_at: iterations whose iterates are kept (for CG-iterate backtracking).
        reorthogonalize: re-orthogonalize the residuals
            (:class:`~second.newton.ResidualBasis`, default ``True``).
        **deprecated: ``rtol``, the deprecated spelling of ``tol`` (removed in 0.3).

    Returns:
        An :class:`InnerCGResult`.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> res = model_cg(lambda v: A @ v, torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> torch.allclose(res.x, torch.tensor([-1.0, -1.0], dtype=torch.float64))
        True
    """
    if deprecated:
        tol = renamed_keyword("model_cg", deprecated, "rtol", "tol", tol, 1e-6)
    save_at = save_at or set()
    matvecs = 0
    if x0 is None:
        x = torch.zeros_like(g)
        Ax = torch.zeros_like(g)
    else:
        x = x0.clone()
        Ax = matvec(x)
        matvecs += 1
    r = -g - Ax  # residual of A d = -g
    p = r.clone()
    rr = float(torch.dot(r, r))
    basis = ResidualBasis(g, preconditioned=False, memory=None if reorthogonalize else 0)
    basis.add(r)
    threshold = tol * float(torch.linalg.vector_norm(g))
    phis = [0.5 * float(torch.dot(x, Ax)) + float(torch.dot(g, x))]
    saved: list[tuple[int, Tensor, Tensor]] = []
    status = "maxiter"
    i = 0
    if math.sqrt(rr) <= threshold:
        status = "converged"
    else:
        for i in range(1, maxiter + 1):
            Ap = matvec(p)
            matvecs += 1
            pAp = float(torch.dot(p, Ap))
            if not pAp > 0:
                status = "negative_curvature"
                i -= 1
                break
            alpha = rr / pAp
            x = x + alpha * p
            Ax = Ax + alpha * Ap
            r = r - alpha * Ap
            phi = 0.5 * float(torch.dot(x, Ax)) + float(torch.dot(g, x))
            phis.append(phi)
            if i in save_at:
                saved.append((i, x.clone(), Ax.clone()))
            end, r, z, rr_new = basis.advance(r, None, threshold)
            if end is not None:
                status = end
                break
            if progress_tol is not None and i >= min_iter:
                k = max(10, i // 10)
                if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * progress_tol:
                    status = "progress"
                    break
            p = z + (rr_new / rr) * p
            rr = rr_new
    if not saved or saved[-1][0] != i:
        saved.append((i, x.clone(), Ax.clone()))
    phi = 0.5 * float(torch.dot(x, Ax)) + float(torch.dot(g, x))
    return InnerCGResult(
        x=x, Ax=Ax, phi=phi, iterations=i, matvecs=matvecs, saved=saved, status=status
    )
