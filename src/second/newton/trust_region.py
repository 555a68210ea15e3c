r"""Trust-region subproblem solvers: Steihaug-Toint truncated CG and an exact dense solver.

Both approximately minimize the quadratic model

.. math:: m(p) = g^\top p + \tfrac12\, p^\top H p \quad\text{subject to}\quad \|p\|_P \le \Delta,

where :math:`H` may be indefinite and :math:`\|p\|_P = \sqrt{p^\top P p}` is the norm the
trust region is measured in (:math:`P = I` without a preconditioner, :math:`P = M^{-1}` with a
preconditioner :math:`M \approx H^{-1}`).

These are pure functions: they take a product ``hvp(v) -> H v`` (or a dense ``H``), a
gradient and a radius, and return the step with its predicted reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._deprecation import renamed_keyword, renamed_property
from .direction import RCOND, ResidualBasis

__all__ = [
    "RCOND",
    "SubproblemResult",
    "SteihaugPath",
    "steihaug_cg",
    "exact_trust_region",
    "boundary_step",
    "update_radius",
]


@dataclass(init=False)
class SubproblemResult:
    r"""The approximate minimizer of a trust-region subproblem.

    Attributes:
        step: the step :math:`p`.
        predicted_reduction: :math:`-m(p) \ge 0`, the decrease the model predicts.
        step_norm: :math:`\|p\|_P`.
        status: ``"converged"`` (interior, residual below tolerance), ``"boundary"`` (a CG
            step left the region), ``"negative_curvature"`` (followed a direction with
            :math:`d^\top H d \le 0` to the boundary), ``"maxiter"``, or ``"exact"``.
        iterations: CG iterations (0 for the dense solver).
        matvecs: Hessian-vector products used (0 when replayed from a stored path).
        path: the stored CG path, for re-solving with a smaller radius at no product cost.

    ``hvps`` is the deprecated spelling of ``matvecs``, as an attribute and as a constructor
    keyword (removed in 0.3); the constructor is the dataclass's, with that keyword.
    """

    step: Tensor
    predicted_reduction: float
    step_norm: float
    status: str
    iterations: int = 0
    matvecs: int = 0
    path: SteihaugPath | None = field(default=None, repr=False)

    def __init__(
        self,
        step: Tensor,
        predicted_reduction: float,
        step_norm: float,
        status: str,
        iterations: int = 0,
        matvecs: int = 0,
        path: SteihaugPath | None = None,
        **deprecated,
    ) -> None:
        if deprecated:
            matvecs = renamed_keyword("SubproblemResult", deprecated, "hvps", "matvecs", matvecs, 0)
        self.step, self.predicted_reduction, self.step_norm = step, predicted_reduction, step_norm
        self.status, self.iterations, self.matvecs, self.path = status, iterations, matvecs, path

    hvps = renamed_property("hvps", "matvecs")

    @property
    def on_boundary(self) -> bool:
        """Whether the step ends on the trust-region boundary."""
        return self.status in ("boundary", "negative_curvature")


def boundary_step(pPp: float, pPd: float, dPd: float, radius: float) -> float:
    r"""The :math:`\tau \ge 0` with :math:`\|p + \tau d\|_P = \Delta`.

    Solves :math:`dPd\,\tau^2 + 2\,pPd\,\tau + pPp - \Delta^2 = 0` for its non-negative root
    (exists whenever :math:`\|p\|_P \le \Delta`), written to avoid cancellation.

    Args:
        pPp: :math:`p^\top P p`.
        pPd: :math:`p^\top P d`.
        dPd: :math:`d^\top P d > 0`.
        radius: :math:`\Delta`.

    Returns:
        :math:`\tau`.

    Example:
        >>> boundary_step(0.0, 0.0, 4.0, 1.0)   # ||tau d|| = 1 with ||d|| = 2
        0.5
    """
    c = pPp - radius * radius  # <= 0 inside the region
    disc = math.sqrt(max(pPd * pPd - dPd * c, 0.0))
    if pPd >= 0:
        return -c / (pPd + disc) if pPd + disc > 0 else 0.0
    return (-pPd + disc) / dPd


class SteihaugPath:
    """The piecewise-linear path of Steihaug-CG iterates, with what is needed to re-cut it.

    CG iterates started at zero grow monotonically in the :math:`P`-norm, so the
    Steihaug solution for any radius smaller than the one the path was computed for is
    the point where this path first leaves the smaller region. A rejected trust-region
    step can therefore be re-solved with :meth:`cut` without a single Hessian product.

    Built with a ``radius``, the path also keeps its cut at that radius up to date as
    segments are added (the step and its residual, updated in place as :meth:`cut` would
    form them), so the first :meth:`cut` at that radius needs no second pass over the path.
    """

    def __init__(self, grad: Tensor, radius: float | None = None):
        self.grad = grad
        # segments: (d, Hd, alpha or None for a negative-curvature ray, dPd, pPd before)
        self.segments: list[tuple[Tensor, Tensor, float | None, float, float]] = []
        self.end_status = "maxiter"
        self.iterations = 0
        # the running cut at `radius`: step, residual g + H p, p^T P p and the segments taken
        self._radius = radius
        self._running: tuple[Tensor, Tensor, float, int] | None = None
        self._inside = radius is not None

    def add(self, d: Tensor, Hd: Tensor, alpha: float | None, dPd: float, pPd: float) -> bool:
        """Append a segment ``p -> p + alpha d`` (``alpha=None``: a ray to the boundary).

        Returns:
            Whether the path, built with a radius, is still strictly inside its region
            (``False`` from the first segment that reaches or crosses the boundary, a ray,
            or a non-finite norm on; always ``False`` for a path built without a radius).
        """
        self.segments.append((d, Hd, alpha, dPd, pPd))
        if not self._inside:
            return False
        assert self._radius is not None
        if self._running is None:
            self._running = (torch.zeros_like(self.grad), self.grad.clone(), 0.0, 0)
        p, r, pPp, taken = self._running
        if alpha is not None:
            new_pPp = pPp + 2 * alpha * pPd + alpha * alpha * dPd
            if new_pPp < self._radius * self._radius:
                p.add_(d, alpha=alpha)
                r.add_(Hd, alpha=alpha)
                self._running = (p, r, new_pPp, taken + 1)
                return True
        self._inside = False  # a ray, a crossing or a NaN norm: cut() ends on this segment
        return False

    def cut(self, radius: float) -> SubproblemResult:
        r"""The Steihaug step for ``radius`` (at most the radius the path was built with)."""
        g = self.grad
        if radius == self._radius and self._running is not None:
            # resume from the running cut; it is handed over once (cut() updates it in place)
            p, r, pPp, start = self._running
            self._running, self._radius = None, None
        else:
            p, r, pPp, start = torch.zeros_like(g), g.clone(), 0.0, 0
        for d, Hd, alpha, dPd, pPd in self.segments[start:]:
            if alpha is not None:
                new_pPp = pPp + 2 * alpha * pPd + alpha * alpha * dPd
                if new_pPp < radius * radius:
                    p.add_(d, alpha=alpha)
                    r.add_(Hd, alpha=alpha)
                    pPp = new_pPp
                    continue
            tau = boundary_step(pPp, pPd, dPd, radius)
            p.add_(d, alpha=tau)
            r.add_(Hd, alpha=tau)
            status = "negative_curvature" if alpha is None else "boundary"
            return _finish(p, r, g, radius, status, self)
        return _finish(p, r, g, math.sqrt(max(pPp, 0.0)), self.end_status, self)


def _finish(p, r, g, norm, status, path) -> SubproblemResult:
    # m(p) = g.p + p.Hp / 2 = (g.p + p.r) / 2 with r = g + H p
    m = 0.5 * (float(torch.dot(g, p)) + float(torch.dot(p, r)))
    return SubproblemResult(
        step=p,
        predicted_reduction=-m,
        step_norm=float(norm),
        status=status,
        iterations=path.iterations,
        path=path,
    )


def steihaug_cg(
    hvp: Callable[[Tensor], Tensor],
    grad: Tensor,
    radius: float,
    *,
    tol: float = 0.1,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Callable[[Tensor], Tensor] | None = None,
    reorthogonalize: bool = True,
    **deprecated,
) -> SubproblemResult:
    r"""Steihaug-Toint truncated conjugate gradient for the trust-region subproblem.

    Runs (preconditioned) CG on :math:`H p = -g` from :math:`p_0 = 0` and stops at the
    first of:

    * a direction of non-positive curvature :math:`d^\top H d \le 0`: follow it to the
      boundary, :math:`p = p_j + \tau d_j` with :math:`\|p\|_P = \Delta`
      (status ``"negative_curvature"``);
    * an iterate outside the region: stop where the CG segment crosses the boundary
      (status ``"boundary"``);
    * the residual :math:`\|g + H p_j\| \le \max(\mathrm{tol}\,\|g\|, \mathrm{atol})`
      (status ``"converged"``, an interior point);
    * ``maxiter`` iterations (status ``"maxiter"``).

    Because the iterates grow monotonically in :math:`\|\cdot\|_P`, every CG step is a
    descent direction for :math:`m` and the result decreases the model at least as much
    as the Cauchy point. The returned :class:`SubproblemResult` carries the path, so a
    smaller radius is re-solved with ``result.path.cut(radius)`` at no product cost.

    Args:
        hvp: ``v -> H v`` on flat vectors.
        grad: the gradient :math:`g` (flat).
        radius: :math:`\Delta > 0`.
        tol: relative residual tolerance (default 0.1).
        atol: absolute residual tolerance (default 0).
        maxiter: CG iteration limit (default ``n``... ``2 n``).
        M: preconditioner ``r -> M r`` with :math:`M \approx H^{-1}` symmetric positive
            definite; the region is then the ellipsoid :math:`\|p\|_{M^{-1}} \le \Delta`,
            whose norms are updated by recurrences (no product with :math:`M^{-1}`).
        reorthogonalize: re-orthogonalize the residuals
            (:class:`~second.newton.ResidualBasis`, default ``True``).
        **deprecated: ``rtol``, the deprecated spelling of ``tol`` (removed in 0.3).

    Returns:
        A :class:`SubproblemResult`.

    Raises:
        ValueError: a non-positive radius, or a preconditioner that is not positive definite.

    Example:
        >>> H = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
        >>> g = torch.tensor([1.0, 1.0], dtype=torch.float64)
        >>> res = steihaug_cg(lambda v: H @ v, g, radius=2.0)
        >>> res.status, round(res.step_norm, 12)
        ('negative_curvature', 2.0)

    References:
        Steihaug (1983); Toint (1981); Nocedal & Wright, *Numerical Optimization*, Alg. 7.2;
        Gould, Lucidi, Roma & Toint (1999) for the preconditioned norms.
    """
    if deprecated:
        tol = renamed_keyword("steihaug_cg", deprecated, "rtol", "tol", tol, 0.1)
    if not radius > 0:
        raise ValueError(f"the trust-region radius must be > 0, got {radius}")
    n = grad.numel()
    maxiter = 2 * n if maxiter is None else int(maxiter)
    path = SteihaugPath(grad, radius)
    gnorm = float(torch.linalg.vector_norm(grad))
    threshold = max(tol * gnorm, atol)
    if gnorm == 0.0 or gnorm <= threshold:
        path.end_status = "converged"
        return path.cut(radius)
    r = grad.clone()
    z = M(r) if M is not None else r
    rz = float(torch.dot(r, z))
    if rz <= 0:
        raise ValueError("the preconditioner M is not positive definite (r^T M r <= 0)")
    basis = ResidualBasis(grad, preconditioned=M is not None, memory=None if reorthogonalize else 0)
    basis.add(r, z if M is not None else None, rz)
    d = -z
    dPd = rz  # d^T P d with P = M^{-1}: (M r)^T M^{-1} (M r) = r^T M r
    pPd = 0.0
    matvecs = 0
    dot, isfinite, advance = torch.dot, math.isfinite, basis.advance
    for j in range(maxiter):
        Hd = hvp(d)
        matvecs += 1
        dHd = float(dot(d, Hd))
        if not isfinite(dHd):
            path.iterations = j + 1
            raise FloatingPointError("the Hessian-vector product is not finite")
        alpha = rz / dHd if dHd > 0 else None  # None: non-positive curvature, a ray
        if not path.add(d, Hd, alpha, dPd, pPd):
            # a ray or a segment that leaves the region (or a non-finite norm): cut there
            path.iterations = j + 1
            break
        end, r, z, rz_new = advance(r + alpha * Hd, M, threshold)
        if end is not None:
            path.iterations = j + 1
            path.end_status = end
            break
        beta = rz_new / rz
        rz = rz_new
        # P-norm recurrences (Gould et al. 1999; exact in exact arithmetic)
        pPd = beta * (pPd + alpha * dPd)
        dPd = rz + beta * beta * dPd
        d = (beta * d).sub_(z)  # -z + beta d, the same rounding (one vector less)
    else:
        path.iterations = maxiter
    res = path.cut(radius)
    res.matvecs = matvecs
    return res


def exact_trust_region(
    H: Tensor,
    grad: Tensor,
    radius: float,
    *,
    tol: float = 1e-10,
    maxiter: int = 100,
    eig: tuple[Tensor, Tensor] | None = None,
    rcond: float = RCOND,
    negligible: float = 0.0,
    **deprecated,
) -> SubproblemResult:
    r"""The exact minimizer of the trust-region subproblem for a dense symmetric :math:`H`.

    With the eigendecomposition :math:`H = Q \Lambda Q^\top` the solution is
    :math:`p(\lambda) = -(H + \lambda I)^{-1} g` with :math:`\lambda \ge \max(0, -\lambda_1)`
    and either :math:`\lambda = 0, \|p(0)\| \le \Delta` (interior Newton step) or
    :math:`\|p(\lambda)\| = \Delta`, found by Newton's method on
    :math:`1/\Delta - 1/\|p(\lambda)\|` (Moré & Sorensen 1983). In the *hard case*
    (:math:`g` orthogonal to the lowest eigenvector of a negative eigenvalue) the
    eigenvector component is added to reach the boundary. For small problems only:
    :math:`O(n^3)`.

    Rounding: eigenvalues within :math:`\delta = \mathrm{rcond}\,\max|\lambda_i|` of zero are
    not resolved by the eigensolver (nor, usually, by the Hessian's own rounding), so
    :math:`\delta` is the smallest shift used, a Hessian with :math:`\lambda_1 \ge -\delta`
    is treated as positive semidefinite (its interior step is the Newton step with the
    unresolved eigenvalues raised to :math:`\delta`), and there is no hard-case walk along an
    unresolved eigenvector. Gradient components along unresolved eigenvectors
    whose joint norm is at most ``negligible`` are dropped: a step along a direction of
    unresolved curvature whose slope is already negligible (e.g. below the stopping
    tolerance) gains nothing and, on a nonlinear function, disturbs the gradient
    elsewhere (a symmetry or a minimizer at infinity makes such directions common). A
    Hessian whose term is below rounding next to the gradient's over the whole region
    (:math:`\|H\|\,\Delta \le 10^{-16} \|g\|`, e.g. :math:`H = 0` for a linear or
    piecewise-linear objective) leaves a linear model: the step is :math:`-\Delta\, g/\|g\|`.

    Args:
        H: symmetric ``n x n`` matrix.
        grad: gradient (length ``n``).
        radius: :math:`\Delta > 0`.
        tol: relative accuracy of :math:`\|p\| = \Delta`: the iteration on :math:`\lambda`
            stops at :math:`|\|p(\lambda)\| - \Delta| \le \mathrm{tol}\,\Delta` (default 1e-10).
        maxiter: Newton iterations on :math:`\lambda` (a limit, default 100).
        eig: ``(values, vectors)`` of ``H`` when already computed (float64).
        rcond: the relative rounding level :math:`\delta / \max|\lambda_i|` (default
            :data:`RCOND`).
        negligible: the slope below which unresolved directions are left alone (default 0:
            none is).
        **deprecated: ``rtol``, the deprecated spelling of ``tol`` (removed in 0.3).

    Returns:
        A :class:`SubproblemResult` with status ``"exact"`` (interior) or ``"boundary"``.

    Raises:
        ValueError: a non-positive radius.

    Example:
        >>> H = torch.eye(2, dtype=torch.float64) * 2
        >>> res = exact_trust_region(H, torch.tensor([2.0, 0.0], dtype=torch.float64), 10.0)
        >>> torch.allclose(res.step, torch.tensor([-1.0, 0.0], dtype=torch.float64))
        True
    """
    if deprecated:
        tol = renamed_keyword("exact_trust_region", deprecated, "rtol", "tol", tol, 1e-10)
    if not radius > 0:
        raise ValueError(f"the trust-region radius must be > 0, got {radius}")
    H64 = 0.5 * (H + H.T).to(torch.float64)
    g64 = grad.to(torch.float64)
    lam, Q = torch.linalg.eigh(H64) if eig is None else eig
    c = Q.T @ g64
    lmin = float(lam[0])
    gn = float(torch.linalg.vector_norm(g64))
    scale = float(lam.abs().max())
    if 0 < gn < math.inf and scale * radius <= _LINEAR * gn:
        # H = 0, or so small that its term is rounding next to g's over the region (and a
        # shift at its rounding level would overflow c / shift): the model is linear, and its
        # minimizer in the region is the boundary step along -g
        return _dense_result(-(radius / gn) * g64, H64, g64, "boundary", grad)
    scale = max(scale, 1e-300)
    tiny = rcond * scale
    unresolved = lam.abs() <= tiny
    if negligible > 0 and bool(unresolved.any()):
        if float(torch.linalg.vector_norm(c[unresolved])) <= negligible:
            g64 = g64 - Q[:, unresolved] @ c[unresolved]  # the model's slope without them
            c = c.masked_fill(unresolved, 0.0)

    def pnorm(mu: float) -> float:
        return float(torch.linalg.vector_norm(c / (lam + mu)))

    if lmin >= -tiny:
        # positive (semi)definite up to rounding: the Newton step, with the unresolved
        # eigenvalues raised to delta (a change of H within its rounding)
        p = -(Q @ (c / lam.clamp_min(tiny)))
        if float(torch.linalg.vector_norm(p)) <= radius:
            return _dense_result(p, H64, g64, "exact", grad)
    mu_lo = max(0.0, -lmin) + tiny
    if pnorm(mu_lo) < radius:
        if lmin >= -tiny:  # the boundary lies between the two: the smallest shift's step
            return _dense_result(-(Q @ (c / (lam + mu_lo))), H64, g64, "exact", grad)
        # hard case: the boundary is not reachable by shifting alone
        p = -(Q @ (c / (lam + mu_lo).where(lam + mu_lo > tiny, torch.full_like(lam, math.inf))))
        q1 = Q[:, 0]
        pp, pq = float(p @ p), float(p @ q1)
        tau = boundary_step(pp, pq, 1.0, radius)
        return _dense_result(p + tau * q1, H64, g64, "boundary", grad)
    mu = mu_lo
    for _ in range(maxiter):
        w = c / (lam + mu)
        nrm = float(torch.linalg.vector_norm(w))
        if abs(nrm - radius) <= tol * radius:
            break
        dn = -float((w * w / (lam + mu)).sum()) / nrm  # d||p||/dmu
        mu_new = mu - (1 / radius - 1 / nrm) / (dn / (nrm * nrm))
        mu = mu_new if mu_new > mu_lo else 0.5 * (mu + mu_lo)
    p = -(Q @ (c / (lam + mu)))
    return _dense_result(p, H64, g64, "boundary", grad)


#: :func:`exact_trust_region` takes the model as linear where ``||H|| radius <= _LINEAR ||g||``
#: (the curvature term is below float64 rounding of the linear one over the whole region).
_LINEAR = 1e-16


def _dense_result(p64: Tensor, H64: Tensor, g64: Tensor, status: str, like: Tensor):
    m = float(g64 @ p64 + 0.5 * p64 @ (H64 @ p64))
    return SubproblemResult(
        step=p64.to(like.dtype),
        predicted_reduction=-m,
        step_norm=float(torch.linalg.vector_norm(p64)),
        status=status,
    )


def update_radius(
    radius: float,
    rho: float,
    step_norm: float,
    on_boundary: bool,
    *,
    max_radius: float = math.inf,
    shrink_below: float = 0.25,
    grow_above: float = 0.75,
) -> float:
    r"""The classical radius update from the ratio :math:`\rho` = actual / predicted reduction.

    :math:`\rho <` ``shrink_below``: :math:`\Delta \leftarrow \tfrac14 \|p\|` (the model was
    poor at this distance); :math:`\rho >` ``grow_above`` with the step on the boundary:
    :math:`\Delta \leftarrow \min(2\Delta, \Delta_{\max})`; otherwise unchanged.

    Example:
        >>> update_radius(1.0, 0.9, 1.0, True)
        2.0
        >>> update_radius(1.0, 0.1, 0.4, False)
        0.1
    """
    if not rho > shrink_below:  # also catches NaN
        return 0.25 * step_norm
    if rho > grow_above and on_boundary:
        return min(2.0 * radius, max_radius)
    return radius
