"""Low-rank (Lanczos / Nystrom-style) inverse with the complement term kept."""

from __future__ import annotations

import torch

from ..spectral.lanczos import eigsh
from ._result import Problem, SolveResult, _norm, report, stopping_threshold

__all__ = ["lowrank", "LowRankInverse"]


class LowRankInverse:
    r"""Apply :math:`(U \Lambda U^\top + \lambda I)^{-1}` for a rank-``k`` eigendecomposition.

    .. math:: (U \Lambda U^\top + \lambda I)^{-1} v = U \frac{1}{\Lambda + \lambda} U^\top v
              + \frac{1}{\lambda} (v - U U^\top v)

    The second (complement) term is what plain top-``k`` truncation drops; without it
    every direction outside the top eigenspace gets weight zero instead of ``1/lambda``.
    Reuse one instance for many right-hand sides (influence functions).
    """

    def __init__(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor, damping: float):
        if damping <= 0:
            raise ValueError(f"the low-rank inverse needs damping > 0, got {damping}")
        self.U = eigenvectors
        self.eigenvalues = eigenvalues
        self.damping = float(damping)
        if bool((eigenvalues + damping <= 0).any()):
            raise ValueError(
                f"eigenvalue {float(eigenvalues.min()):.3e} + damping {damping} <= 0: "
                "the damped low-rank approximation is not invertible"
            )

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        c = self.U.T @ v
        return (
            self.U @ (c / (self.eigenvalues + self.damping).reshape(-1, *([1] * (c.dim() - 1))))
            + (v - self.U @ c) / self.damping
        )


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
    warn: bool = False,
    **unused,
) -> SolveResult:
    r"""Approximate :math:`(A + \lambda I)^{-1} b` from the top-``rank`` eigenpairs of ``A``.

    The eigenpairs come from :func:`~second.eigsh` (Lanczos); the inverse is
    :class:`LowRankInverse`, which keeps the complement term :math:`(I - UU^\top)b/\lambda`.
    Exact when ``A`` has rank ``<= rank``. This is an approximation, not an iterative
    solve: ``converged`` reports whether the true residual meets the tolerance (one extra
    product), and ``warn`` defaults to ``False``. Needs ``damping > 0``.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=torch.float64))
        >>> res = lowrank(A, torch.ones(4, dtype=torch.float64), rank=2, damping=1.0)
        >>> res.x
        tensor([0.1667, 0.2500, 1.0000, 1.0000], dtype=torch.float64)
    """
    for key in unused:
        if key not in ("x0", "M", "maxiter", "callback"):
            raise TypeError(f"lowrank() got an unexpected keyword argument {key!r}")
    pb = Problem(A, b, None, 0.0)
    op = pb.A
    vals, vecs = eigsh(op, k=min(rank, pb.n), which=which, tol=eig_tol)
    inv = LowRankInverse(vals, vecs, damping)
    x = inv(pb.b)
    r = pb.b - (op @ x + damping * x)
    rnorm = _norm(r)
    threshold = stopping_threshold(_norm(pb.b), tol, atol)
    res = pb.result(
        x,
        converged=rnorm <= threshold,
        iterations=1,
        residual_norms=[_norm(pb.b), rnorm],
        negative_curvature=bool(
            (vals < -1e3 * torch.finfo(vals.dtype).eps * vals.abs().max()).any()
        ),
        method="lowrank",
        info={"eigenvalues": vals, "eigenvectors": vecs, "inverse": inv, "warn_negative": False},
        message=f"rank-{vals.numel()} inverse with damping {damping}: ||r|| = {rnorm:.3e}",
    )
    return report(res, warn)
