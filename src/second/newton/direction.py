r"""Search directions of the Newton core: truncated CG with forcing terms, and dense Newton.

:func:`truncated_cg` approximately solves the Newton system :math:`H d = -g` by
(preconditioned) conjugate gradient, stopped by a *forcing term* :math:`\eta_k` (relative
residual :math:`\|H d + g\| \le \eta_k \|g\|`), optionally warm-started, and reports a
direction of non-positive curvature when it meets one. :func:`forcing_term` is the
Eisenstat-Walker rule, :func:`dense_newton_direction` the eigenvalue-modified dense step.
The trust-region subproblem solvers (Steihaug-Toint CG, exact) live in
:mod:`second.newton.trust_region`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .._deprecation import renamed_keyword

__all__ = [
    "DirectionInfo",
    "RCOND",
    "REORTH_MEMORY",
    "ResidualBasis",
    "forcing_term",
    "truncated_cg",
    "dense_newton_direction",
    "model_minimizer_within",
]


RCOND = 1e-10
"""Eigenvalues of a dense Hessian within this share of its largest magnitude are taken as
unresolved by rounding (:func:`~second.newton.exact_trust_region`,
:func:`dense_newton_direction`). Deliberately above the glossary's pseudo-inverse cutoff
(``n eps``): it is a shift floor for a trust-region model, not a rank decision, and an
autograd Hessian carries more rounding than eigh's backward error. Chosen on the
teacher-student networks (bench_newton.py, BENCHMARKS.md): 1e-10 took 306-435 iterations
on six seeds, 1e-12 up to 657 and 1e-14 up to 1,154."""


@dataclass
class DirectionInfo:
    r"""How a direction was computed.

    Attributes:
        status: ``"converged"`` (forcing tolerance met), ``"negative_curvature"`` (a CG
            direction with :math:`p^\top H p \le 0` stopped the loop), ``"maxiter"``, or
            ``"dense"``.
        iterations: CG iterations.
        matvecs: products with :math:`H` (one more for a warm start).
        model_decrease: :math:`-(g^\top d + \tfrac12 d^\top H d)`.
        negative_curvature: the direction :math:`s` with :math:`s^\top H s \le 0`, signed so
            that :math:`g^\top s \le 0` and scaled to :math:`\|s\| = 1` (``None`` if none met).
        curvature: :math:`s^\top H s` for that unit direction.
        warm_started: whether the warm start was used (it is dropped when it does not
            decrease the model).
    """

    status: str
    iterations: int = 0
    matvecs: int = 0
    model_decrease: float = 0.0
    negative_curvature: Tensor | None = None
    curvature: float = 0.0
    warm_started: bool = False


REORTH_MEMORY = 64 * 2**20
"""Bytes the CG loops of the Newton core may spend on stored residuals for re-orthogonalization
(:class:`ResidualBasis`); past it CG goes on without (64 MiB: 800 residuals of 10,000 float64
unknowns, 16 of a million float32 ones, with a preconditioner half as many)."""


class ResidualBasis:
    r"""Full re-orthogonalization of CG residuals, within a memory budget.

    In exact arithmetic CG's residuals are mutually orthogonal (:math:`M`-orthogonal with a
    preconditioner, :math:`r_i^\top M r_j = 0`); in floating point they lose it on an
    ill-conditioned :math:`H`, and CG then needs many times ``n`` products (a quadratic of
    condition 1e8 in 100 unknowns: 3,000 CG iterations for a residual of 0.1, 100 with the
    residuals re-orthogonalized). Each new residual is projected, twice (Gram-Schmidt), off
    the stored ones: :math:`r \leftarrow r - \sum_i r_i (z_i^\top r)` with
    :math:`z_i = M r_i` scaled so that :math:`z_i^\top r_i = 1`. At most
    ``memory`` bytes of residuals are kept (:data:`REORTH_MEMORY`), and at most ``n`` of
    them; past the memory the loop is plain CG, and once ``n`` are stored they span the space
    and CG stops (:attr:`spans`; status ``"maxiter"`` unless the residual met the tolerance).

    Args:
        like: a vector of the problem's size, dtype and device.
        preconditioned: whether :math:`z_i \neq r_i` (two vectors kept per residual).
        memory: bytes (default :data:`REORTH_MEMORY`; 0 turns the re-orthogonalization off).

    Example:
        >>> b = ResidualBasis(torch.zeros(3, dtype=torch.float64), preconditioned=False)
        >>> b.add(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
        >>> b.project(torch.tensor([1e-3, 2.0, 0.0], dtype=torch.float64)).tolist()
        [0.0, 2.0, 0.0]
    """

    def __init__(self, like: Tensor, *, preconditioned: bool, memory: int | None = None):
        n = like.numel()
        per = n * like.element_size() * (2 if preconditioned else 1)
        budget = REORTH_MEMORY if memory is None else memory
        self.capacity = min(n, budget // max(per, 1))
        self._preconditioned = preconditioned
        self._like = like
        self._n = n
        self._R: Tensor | None = None  # [rows, n], grown by doubling
        self._Z: Tensor | None = None
        self.size = 0

    def add(self, r: Tensor, z: Tensor | None = None, rz: float | None = None) -> None:
        """Store residual ``r`` (and ``z = M r``); ignored when full or when ``r^T z <= 0``.

        ``rz``: ``r^T z``, when the caller has it already.
        """
        size = self.size
        if size >= self.capacity:
            return
        if rz is None:
            rz = float(torch.dot(r, r if z is None else z))
        if not (rz > 0 and math.isfinite(rz)):
            return
        if self._R is None or size == self._R.shape[0]:
            rows = min(self.capacity, max(8, 2 * size))
            grown = self._like.new_empty(rows, self._n)
            if self._R is not None:
                grown[:size] = self._R[:size]
            self._R = grown
            if self._preconditioned:
                grown_z = self._like.new_empty(rows, self._n)
                if self._Z is not None:
                    grown_z[:size] = self._Z[:size]
                self._Z = grown_z
        scale = 1.0 / math.sqrt(rz)
        # detached copies: the projection stays differentiable through the new residual
        if r.requires_grad or r.dim() != 1:
            r = r.detach().reshape(-1)
        torch.mul(r, scale, out=self._R[size])
        if self._preconditioned:
            assert self._Z is not None and z is not None
            if z.requires_grad or z.dim() != 1:
                z = z.detach().reshape(-1)
            torch.mul(z, scale, out=self._Z[size])
        self.size = size + 1

    def advance(
        self, r: Tensor, M: Callable[[Tensor], Tensor] | None, threshold: float
    ) -> tuple[str | None, Tensor, Tensor, float]:
        r"""CG's new residual ``r``: ``(status, r, z, r^T z)`` with :math:`z = M r`.

        ``status`` is ``"converged"`` when :math:`\|r\| \le` ``threshold`` and
        ``"maxiter"`` when the stored residuals already span the space (the loop ends
        either way); else ``None``, and ``r`` is projected off the stored residuals and
        stored itself.

        Raises:
            ValueError: ``M`` is not positive definite on ``r``.
        """
        # nothing to project off and no preconditioner (plain CG): r^T r is all it takes
        rr = float(torch.dot(r, r)) if M is None and not self.size else None
        norm = math.sqrt(rr) if rr is not None and rr >= 0 else float(torch.linalg.vector_norm(r))
        if norm <= threshold:
            return "converged", r, r, 0.0
        if self.size >= self._n:  # spans: n residuals stored, none is orthogonal to them
            return "maxiter", r, r, 0.0
        if self.size:
            r = self.project(r)
        z = M(r) if M is not None else r
        rz = rr if rr is not None else float(torch.dot(r, z))
        if M is not None and not rz > 0:
            raise ValueError("the preconditioner M is not positive definite (r^T M r <= 0)")
        self.add(r, z if M is not None else None, rz)
        return None, r, z, rz

    @property
    def spans(self) -> bool:
        """Whether the stored residuals span the whole space (CG cannot go further)."""
        return self.size >= self._n

    def project(self, r: Tensor) -> Tensor:
        """``r`` with its components along the stored residuals removed (twice)."""
        if not self.size:
            return r
        assert self._R is not None
        R = self._R[: self.size]
        Z = self._Z[: self.size] if self._Z is not None else R
        RT = R.T
        for _ in range(2):
            r = r - RT @ (Z @ r)
        return r


def forcing_term(
    gnorm: float,
    gnorm_prev: float | None,
    eta_prev: float | None,
    *,
    eta_max: float = 0.5,
    gamma: float = 0.9,
    alpha: float = 2.0,
) -> float:
    r"""The Eisenstat-Walker forcing term (their choice 2) for an inexact Newton step.

    .. math:: \eta_k = \min\Big(\eta_{\max},\ \max\big(\gamma (\|g_k\|/\|g_{k-1}\|)^\alpha,
              \ \gamma \eta_{k-1}^\alpha\big)\Big),

    where the safeguard :math:`\gamma\eta_{k-1}^\alpha` is used only when it exceeds 0.1
    (it keeps :math:`\eta` from falling too fast after one lucky iteration). The first
    iteration gets :math:`\eta_{\max}`. With :math:`\alpha = 2` the inexact Newton method
    converges quadratically near a nondegenerate minimizer, while early iterations, far
    from it, solve loosely.

    Args:
        gnorm: :math:`\|g_k\|`.
        gnorm_prev: :math:`\|g_{k-1}\|` (``None`` on the first iteration).
        eta_prev: :math:`\eta_{k-1}` (``None`` on the first iteration).
        eta_max: the largest forcing term (default 0.5).
        gamma: default 0.9.
        alpha: default 2.

    Returns:
        :math:`\eta_k \in (0, \eta_{\max}]`.

    Example:
        >>> forcing_term(1e-2, 1.0, 0.1)   # the gradient fell 100x: solve tightly
        9e-05
        >>> forcing_term(1.0, None, None)
        0.5

    References:
        Eisenstat & Walker (1996), *Choosing the forcing terms in an inexact Newton method*,
        SIAM J. Sci. Comput. 17(1).
    """
    if gnorm_prev is None or eta_prev is None or not gnorm_prev > 0:
        return eta_max
    eta = gamma * (gnorm / gnorm_prev) ** alpha
    guard = gamma * eta_prev**alpha
    if guard > 0.1:
        eta = max(eta, guard)
    return float(min(eta_max, max(eta, 1e-16)))


def truncated_cg(
    hvp: Callable[[Tensor], Tensor],
    g: Tensor,
    *,
    tol: float | None = None,
    maxiter: int,
    M: Callable[[Tensor], Tensor] | None = None,
    x0: Tensor | None = None,
    atol: float = 0.0,
    reorthogonalize: bool = True,
    **deprecated,
) -> tuple[Tensor, DirectionInfo]:
    r"""Truncated (preconditioned) CG on the Newton system :math:`H d = -g`.

    Stopping rule: :math:`\|g + H d\| \le \max(\mathrm{tol}\,\|g\|, \mathrm{atol})`, or a
    direction :math:`p` with :math:`p^\top H p \le 0`, or ``maxiter`` iterations. On
    non-positive curvature at the first iteration the direction is the preconditioned
    steepest descent :math:`-M g`; later, the last CG iterate (a descent direction for the
    model, since every CG iterate from a point that decreases the model decreases it
    further). The curvature direction itself is returned in the info (unit norm, signed
    downhill) so the caller can use it, e.g. by searching along it.

    A warm start ``x0`` (typically the previous Newton direction) costs one product and is
    kept only when it decreases the model, :math:`g^\top x_0 + \tfrac12 x_0^\top H x_0 < 0`.

    Args:
        hvp: ``v -> H v`` on flat vectors.
        g: the gradient (flat).
        tol: relative residual tolerance (the forcing term; required).
        maxiter: CG iteration limit.
        M: preconditioner ``r -> M r`` with :math:`M \approx H^{-1}` symmetric positive
            definite (default none).
        x0: warm start (default zero).
        atol: absolute residual tolerance (default 0).
        reorthogonalize: re-orthogonalize the residuals (:class:`ResidualBasis`, default
            ``True``): on an ill-conditioned :math:`H` CG then needs about ``n`` products
            instead of many times that.
        **deprecated: ``rtol``, the deprecated spelling of ``tol`` (removed in 0.3).

    Returns:
        ``(d, info)``: the direction and a :class:`DirectionInfo`.

    Raises:
        FloatingPointError: a product is not finite.
        ValueError: ``M`` is not positive definite on a residual.

    Example:
        >>> H = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> g = torch.tensor([1.0, 4.0], dtype=torch.float64)
        >>> d, info = truncated_cg(lambda v: H @ v, g, tol=1e-12, maxiter=10)
        >>> torch.allclose(d, -torch.ones(2, dtype=torch.float64)), info.status
        (True, 'converged')
        >>> d, info = truncated_cg(lambda v: -v, g, tol=1e-12, maxiter=10)
        >>> info.status, bool(g @ d < 0), info.curvature
        ('negative_curvature', True, -1.0)
    """
    if deprecated or tol is None:
        tol = renamed_keyword("truncated_cg", deprecated, "rtol", "tol", tol)
    gnorm = float(torch.linalg.vector_norm(g))
    threshold = max(tol * gnorm, atol)
    info = DirectionInfo(status="maxiter")
    x = torch.zeros_like(g)
    r = g.clone()  # r = g + H x
    if (
        x0 is not None
        and bool(torch.isfinite(x0).all())
        and float(torch.linalg.vector_norm(x0)) > 0
    ):
        Hx0 = hvp(x0)
        info.matvecs += 1
        r0 = g + Hx0
        phi0 = 0.5 * (float(torch.dot(g, x0)) + float(torch.dot(x0, r0)))
        if math.isfinite(phi0) and phi0 < 0:
            x, r, info.warm_started = x0.clone(), r0, True
    if gnorm == 0.0 or float(torch.linalg.vector_norm(r)) <= threshold:
        info.status = "converged"
        info.model_decrease = -0.5 * (float(torch.dot(g, x)) + float(torch.dot(x, r)))
        return x, info
    z = M(r) if M is not None else r
    rz = float(torch.dot(r, z))
    if M is not None and not rz > 0:
        raise ValueError("the preconditioner M is not positive definite (r^T M r <= 0)")
    basis = ResidualBasis(g, preconditioned=M is not None, memory=None if reorthogonalize else 0)
    basis.add(r, z if M is not None else None)
    p = -z
    for j in range(maxiter):
        Hp = hvp(p)
        info.matvecs += 1
        info.iterations = j + 1
        pHp = float(torch.dot(p, Hp))
        if not math.isfinite(pHp):
            raise FloatingPointError("the Hessian-vector product is not finite")
        pp = float(torch.dot(p, p))
        if pHp <= 0:
            s = p / math.sqrt(pp)
            if float(torch.dot(g, s)) > 0:
                s = -s
            info.negative_curvature, info.curvature = s, pHp / pp
            info.status = "negative_curvature"
            if j == 0 and not info.warm_started:
                # no model-decreasing CG iterate yet: preconditioned steepest descent, scaled
                # by the curvature's magnitude (the line search or region fixes the length)
                x = -z * (rz / max(abs(pHp), 1e-300 * pp)) if pHp != 0 else -z
                x = x if bool(torch.isfinite(x).all()) else -z
                Hx = hvp(x)
                info.matvecs += 1
                r = g + Hx
            break
        alpha = rz / pHp
        x = x + alpha * p
        end, r, z, rz_new = basis.advance(r + alpha * Hp, M, threshold)
        if end is not None:
            info.status = end
            break
        p = -z + (rz_new / rz) * p
        rz = rz_new
    info.model_decrease = -0.5 * (float(torch.dot(g, x)) + float(torch.dot(x, r)))
    return x, info


def dense_newton_direction(
    H: Tensor, g: Tensor, *, rcond: float | None = None
) -> tuple[Tensor, DirectionInfo]:
    r"""The Newton direction for a dense :math:`H`, with the eigenvalues modified to be positive.

    With :math:`H = Q \Lambda Q^\top`, returns :math:`d = -Q |\Lambda|_\delta^{-1} Q^\top g`
    where :math:`|\lambda|_\delta = \max(|\lambda|, \delta)`, :math:`\delta = \mathrm{rcond}
    \max|\lambda|`: negative eigenvalues are flipped (the step moves downhill along them,
    as far as their curvature suggests) and tiny ones floored (Nocedal & Wright, section 3.4;
    Gill, Murray & Wright's modified Newton). The direction is a descent direction.

    Args:
        H: symmetric ``n x n``.
        g: gradient.
        rcond: the relative floor :math:`\delta / \max|\lambda|` (default
            :data:`RCOND`).

    Returns:
        ``(d, info)`` (``info.status == "dense"``, ``negative_curvature`` the lowest
        eigenvector when :math:`\lambda_1 < 0`).

    Example:
        >>> H = torch.diag(torch.tensor([2.0, -1.0], dtype=torch.float64))
        >>> d, info = dense_newton_direction(H, torch.tensor([2.0, 1.0], dtype=torch.float64))
        >>> d.tolist(), info.curvature
        ([-1.0, -1.0], -1.0)
    """
    H64 = 0.5 * (H + H.T).to(torch.float64)
    lam, Q = torch.linalg.eigh(H64)
    scale = max(float(lam.abs().max()), 1e-300)
    delta = (RCOND if rcond is None else rcond) * scale
    mod = lam.abs().clamp_min(delta)
    c = Q.T @ g.to(torch.float64)
    d = -(Q @ (c / mod))
    info = DirectionInfo(status="dense", curvature=float(lam[0]))
    if float(lam[0]) < 0:
        s = Q[:, 0]
        info.negative_curvature = (s if float(s @ g.to(torch.float64)) <= 0 else -s).to(g.dtype)
    info.model_decrease = -float(c @ (-(c / mod)) + 0.5 * ((c / mod) ** 2 * lam).sum())
    return d.to(g.dtype), info


def model_minimizer_within(
    hvp: Callable[[Tensor], Tensor], g: Tensor, distance: float, *, maxiter: int
) -> bool:
    r"""Whether the quadratic model :math:`g^\top d + \tfrac12 d^\top H d` has its minimizer near.

    Runs CG on :math:`H d = -g` (to a relative residual of 0.1, at most ``maxiter``
    products): true when CG converges without meeting non-positive curvature to a step
    :math:`\|d\| \le` ``distance``. The unbounded test's geometric form asks it before
    reporting iterates that grow geometrically: a trust region that doubles its radius on
    the way to a far but finite minimizer grows them so too, while its model points at the
    minimizer; a saturating network's model has negative curvature or no minimizer near.

    Example:
        >>> H = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
        >>> g = torch.tensor([1.0, 4.0], dtype=torch.float64)   # the minimizer is d = (-1, -1)
        >>> model_minimizer_within(lambda v: H @ v, g, 2.0, maxiter=10)
        True
        >>> model_minimizer_within(lambda v: H @ v, g, 1.0, maxiter=10)
        False
    """
    d, info = truncated_cg(hvp, g, tol=0.1, maxiter=maxiter)
    if info.status != "converged":
        return False
    return float(torch.linalg.vector_norm(d)) <= distance
