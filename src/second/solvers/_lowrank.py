"""Low-rank (Lanczos / Nystrom-style) inverse with the complement term kept."""

from __future__ import annotations

import torch

from ..operators.base import aslinearoperator
from ..spectral.lanczos import eigsh
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
    their mean. Reuse one instance for many right-hand sides (influence functions).
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
        c = self.U.T @ v
        return self.U @ (
            c / (self.eigenvalues + self.damping).reshape(-1, *([1] * (c.dim() - 1)))
        ) + (v - self.U @ c) / (self.complement_eigenvalue + self.damping)


def lowrank_inverse(
    A,
    rank: int,
    damping: float,
    *,
    which: str = "LA",
    eig_tol: float = 1e-4,
    complement: str | float = "zero",
    complement_probes: int = 10,
    generator: torch.Generator | None = None,
) -> LowRankInverse:
    """Build the :class:`LowRankInverse` of ``A + damping I`` from ``rank`` Lanczos eigenpairs.

    ``complement``: see :func:`lowrank`. Reuse the result for many right-hand sides.
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    vals, vecs = eigsh(op, k=min(int(rank), n), which=which, tol=eig_tol)
    k = vals.numel()
    if complement == "zero":
        c = 0.0
    elif complement == "mean":
        c = 0.0
        if n > k:
            g = generator or torch.Generator(device=op.device).manual_seed(0)
            Z = torch.randint(0, 2, (n, complement_probes), generator=g, device=op.device)
            Z = Z.to(op.dtype) * 2 - 1
            Z = Z - vecs @ (vecs.T @ Z)
            c = max(0.0, float((Z * (op @ Z)).sum()) / complement_probes / (n - k))
    elif isinstance(complement, (int, float)):
        c = float(complement)
    else:
        raise ValueError(f"complement must be 'zero', 'mean' or a number, got {complement!r}")
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
    generator: torch.Generator | None = None,
    warn: bool = False,
    **unused,
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
    spectrum has a heavy tail, as influence-function Hessians do), or a number.

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
    inv = lowrank_inverse(
        op,
        rank,
        damping,
        which=which,
        eig_tol=eig_tol,
        complement=complement,
        complement_probes=complement_probes,
        generator=generator,
    )
    vals, vecs, c = inv.eigenvalues, inv.U, inv.complement_eigenvalue

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
