"""Low-rank (Lanczos / Nystrom-style) inverse with the complement term kept."""

from __future__ import annotations

import torch

from ..func.dense import eigenvalue_cutoff
from ..func.inner import coefficients, project_off
from ..operators.base import CallableOperator, aslinearoperator
from ..spectral import eigsh, lanczos
from ..spectral.lanczos import tridiagonal
from ._result import Problem, SolveResult, _norm, report, stopping_threshold

__all__ = ["lowrank", "lowrank_inverse", "LowRankInverse"]


class LowRankInverse:
    r"""Apply the inverse of a damped rank-``k`` eigendecomposition, complement kept.

    The operator inverted is :math:`U \Lambda U^\top + c\,(I - UU^\top) + \lambda I`:

    .. math:: v \mapsto U \frac{1}{\Lambda + \lambda} U^\top v
              + \frac{1}{c + \lambda} (v - U U^\top v)

    The second (complement) term is what plain top-``k`` truncation drops; without it
    every direction outside the top eigenspace gets weight zero instead of
    :math:`1/(c + \lambda)`. ``c`` (``complement_eigenvalue``, default 0: the Nystrom
    approximation) stands for the eigenvalues left out; :func:`lowrank` can estimate it as
    their mean or, by quadrature, a damped harmonic mean. Reuse one instance for many
    right-hand sides (influence functions).
    """

    def __init__(
        self,
        eigenvalues: torch.Tensor,
        eigenvectors: torch.Tensor,
        damping: float,
        complement_eigenvalue: float = 0.0,
    ):
        if damping + complement_eigenvalue <= 0:
            raise ValueError(
                f"the low-rank inverse needs damping + complement_eigenvalue > 0, got "
                f"{damping} + {complement_eigenvalue}"
            )
        self.U = eigenvectors
        self.eigenvalues = eigenvalues
        self.damping = float(damping)
        self.complement_eigenvalue = float(complement_eigenvalue)
        if bool((eigenvalues + damping <= 0).any()):
            raise ValueError(
                f"eigenvalue {float(eigenvalues.min()):.3e} + damping {damping} <= 0: "
                "the damped low-rank approximation is not invertible"
            )

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        c = coefficients(self.U, v)
        return self.U @ (
            c / (self.eigenvalues + self.damping).reshape(-1, *([1] * (c.dim() - 1)))
        ) + (v - self.U @ c) / (self.complement_eigenvalue + self.damping)


def _complement_probes(op, vecs, probes: int, generator) -> torch.Tensor:
    """Rademacher probes projected off the columns of ``vecs``: ``(I - UU^T) Z``."""
    g = generator or torch.Generator(device=op.device).manual_seed(0)
    Z = torch.randint(0, 2, (op.shape[0], probes), generator=g, device=op.device)
    Z = Z.to(op.dtype) * 2 - 1
    return project_off(Z, vecs)


def _slq_complement(
    op, vecs, damping: float, probes: int, steps: int, generator, weighted: bool
) -> float:
    r"""The complement eigenvalue ``c`` of ``"harmonic"`` / ``"weighted"``, by quadrature.

    With :math:`P = I - UU^\top`, :math:`B = PAP` and :math:`\lambda` the damping:

    * ``weighted=False``: :math:`1/(c + \lambda) = \mathrm{tr}(P(B + \lambda I)^{-1}P)
      / (n - k)`, the mean of :math:`1/(\lambda_i + \lambda)` over the remaining
      eigenvalues;
    * ``weighted=True``: :math:`1/(c + \lambda) = \mathrm{tr}(B (B + \lambda I)^{-1})
      / \mathrm{tr}(B)`, the same mean weighted by :math:`\lambda_i`.

    Stochastic Lanczos quadrature: for each projected probe :math:`z`, ``steps`` Lanczos
    steps on :math:`B` from :math:`z` give Ritz values :math:`\theta_j` and weights
    :math:`\tau_j^2`, and :math:`z^\top f(B) z \approx \|z\|^2 \sum_j \tau_j^2 f(\theta_j)`.
    Numerator and denominator are summed over the probes before dividing (a ratio
    estimate, exact for a flat tail whatever the probes).
    """
    n = op.shape[0]
    name = "weighted" if weighted else "harmonic"

    def proj(v):
        return project_off(v, vecs)

    pap = CallableOperator(lambda v: proj(op @ proj(v)), n, op.dtype, op.device)
    Z = _complement_probes(op, vecs, probes, generator)
    num = den = 0.0
    for i in range(probes):
        z = Z[:, i]
        znorm2 = float(z @ z)
        if znorm2 == 0.0:
            continue
        alpha, beta, _ = lanczos(pap, z, steps)
        theta, S = torch.linalg.eigh(tridiagonal(alpha, beta))
        shifted = theta + damping
        if bool((shifted <= 0).any()):  # indefinite tail beyond the damping
            raise ValueError(
                f"complement={name!r}: a Ritz value {float(theta.min()):.3e} of the "
                f"complement is <= -damping ({damping}); use complement='mean' or more damping"
            )
        tau2 = S[0] ** 2
        if weighted:
            num += znorm2 * float((tau2 * theta / shifted).sum())
            den += znorm2 * float((tau2 * theta).sum())
        else:
            num += znorm2 * float((tau2 / shifted).sum())
            den += znorm2
    if num <= 0.0 or den <= 0.0:
        return 0.0
    return max(0.0, den / num - damping)


def lowrank_inverse(
    A,
    rank: int,
    damping: float,
    *,
    which: str = "LA",
    eig_tol: float = 1e-4,
    complement: str | float = "zero",
    complement_probes: int = 10,
    complement_steps: int = 30,
    generator: torch.Generator | None = None,
) -> LowRankInverse:
    """Build the :class:`LowRankInverse` of ``A + damping I`` from ``rank`` Lanczos eigenpairs.

    ``complement``: see :func:`lowrank`. Reuse the result for many right-hand sides.
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    vals, vecs = eigsh(op, k=min(int(rank), n), which=which, tol=eig_tol)
    k = vals.numel()
    if complement in ("harmonic", "weighted") and damping <= 0:
        raise ValueError(f"complement={complement!r} needs damping > 0, got {damping}")
    if complement == "zero":
        c = 0.0
    elif complement == "mean":
        c = 0.0
        if n > k:
            Z = _complement_probes(op, vecs, complement_probes, generator)
            c = max(0.0, float((Z * (op @ Z)).sum()) / complement_probes / (n - k))
    elif complement in ("harmonic", "weighted"):
        c = 0.0
        if n > k:
            c = _slq_complement(
                op,
                vecs,
                float(damping),
                complement_probes,
                complement_steps,
                generator,
                weighted=complement == "weighted",
            )
    elif isinstance(complement, (int, float)) and not isinstance(complement, bool):
        c = float(complement)
    else:
        raise ValueError(
            "complement must be 'zero', 'mean', 'harmonic', 'weighted' or a number, got "
            f"{complement!r}"
        )
    return LowRankInverse(vals, vecs, damping, complement_eigenvalue=c)


def lowrank(
    A,
    b,
    *,
    rank: int = 20,
    damping: float = 0.0,
    which: str = "LA",
    tol: float = 1e-6,
    atol: float = 0.0,
    eig_tol: float = 1e-4,
    complement: str | float = "zero",
    complement_probes: int = 10,
    complement_steps: int = 30,
    generator: torch.Generator | None = None,
    warn: bool = False,
) -> SolveResult:
    r"""Approximate :math:`(A + \lambda I)^{-1} b` from the top-``rank`` eigenpairs of ``A``.

    The eigenpairs come from :func:`~second.eigsh` (Lanczos); the inverse is
    :class:`LowRankInverse`, which keeps the complement term :math:`(I - UU^\top)b/\lambda`.
    Exact when ``A`` has rank ``<= rank``. This is an approximation, not an iterative
    solve: ``converged`` reports whether the true residual meets the tolerance (one extra
    product), and ``warn`` defaults to ``False``. Needs ``damping > 0``.

    ``complement`` sets the eigenvalue ``c`` given to the directions outside the top
    eigenspace: ``"zero"`` (default; Nystrom, exact for a rank-``k`` matrix), ``"mean"``
    (their mean eigenvalue, :math:`\mathrm{tr}((I-UU^\top) A (I-UU^\top)) / (n - k)`, from
    ``complement_probes`` Hutchinson probes projected off :math:`U`: better when the
    spectrum has a heavy tail, as influence-function Hessians do), ``"harmonic"`` (the
    ``c`` whose :math:`1/(c + \lambda)` is the mean of :math:`1/(\lambda_i + \lambda)` over
    the remaining eigenvalues, :math:`\mathrm{tr}((I-UU^\top)(A + \lambda I)^{-1}
    (I-UU^\top)) / (n - k)`: exact on average for right-hand sides with identity
    covariance), ``"weighted"`` (the same mean weighted by :math:`\lambda_i`,
    :math:`1/(c + \lambda) = \mathrm{tr}(B (B + \lambda I)^{-1}) / \mathrm{tr}(B)`,
    :math:`B = (I-UU^\top) A (I-UU^\top)`: exact on average for right-hand sides whose
    covariance is :math:`A`, such as gradients when :math:`A` is a Fisher, GGN or the
    Hessian at a minimum of a likelihood), or a number. ``"harmonic"`` and ``"weighted"``
    use stochastic Lanczos quadrature: ``complement_probes`` probes projected off
    :math:`U`, ``complement_steps`` Lanczos steps on :math:`B` each, and need
    ``damping > 0``. The two differ from ``"mean"`` when the remaining eigenvalues span
    orders of magnitude; which is best depends on the right-hand sides.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=torch.float64))
        >>> res = lowrank(A, torch.ones(4, dtype=torch.float64), rank=2, damping=1.0)
        >>> res.x
        tensor([0.1667, 0.2500, 1.0000, 1.0000], dtype=torch.float64)
    """
    pb = Problem(A, b, None, 0.0, method="lowrank", allow_complex=False)
    op = pb.A
    inv = lowrank_inverse(
        op,
        rank,
        damping,
        which=which,
        eig_tol=eig_tol,
        complement=complement,
        complement_probes=complement_probes,
        complement_steps=complement_steps,
        generator=generator,
    )
    vals, vecs, c = inv.eigenvalues, inv.U, inv.complement_eigenvalue

    x = inv(pb.vector)
    r = pb.vector - (op @ x + damping * x)
    rnorm = _norm(r)
    threshold = stopping_threshold(_norm(pb.vector), tol, atol)
    res = pb.result(
        x,
        converged=rnorm <= threshold,
        iterations=1,
        residual_norms=[_norm(pb.vector), rnorm],
        # Lanczos eigenvalues: a looser relative cutoff than a dense eigendecomposition's
        negative_curvature=bool(
            (vals < -eigenvalue_cutoff(vals, rcond=1e3 * torch.finfo(vals.dtype).eps)).any()
        ),
        method="lowrank",
        info={
            "eigenvalues": vals,
            "eigenvectors": vecs,
            "inverse": inv,
            "complement_eigenvalue": c,
            "warn_negative": False,
        },
        message=f"rank-{vals.numel()} inverse with damping {damping}: ||r|| = {rnorm:.3e}",
    )
    return report(res, warn)
