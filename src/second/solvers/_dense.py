"""Direct solve on the dense matrix, for small problems."""

from __future__ import annotations

import torch

from ._result import Problem, SolveResult, _norm, report, stopping_threshold

__all__ = ["dense"]


def dense(
    A,
    b,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    rcond: float | None = None,
    chunk_size: int | None = 256,
    warn: bool = True,
) -> SolveResult:
    r"""Form :math:`A + \lambda I` (batched products) and solve in float64 by eigendecomposition.

    Costs ``n`` products (batched ``chunk_size`` at a time) and ``O(n^3)`` work: for
    small problems, and as the reference the iterative methods are measured against.
    A singular or numerically singular matrix (eigenvalues below
    ``rcond * max|eigenvalue|``, default ``max(n * eps(float64), eps(operator dtype))``:
    below that an eigenvalue of a matrix formed from float32 products is rounding noise)
    is solved in the least-squares sense: the minimum-norm (pseudo-inverse) solution,
    which is exact for a consistent system (e.g. the softmax shift mode, which carries
    no gradient). ``info["rank"]`` records the rank kept.

    Stopping rule: ``converged`` means the true residual satisfies
    ``||b - A x|| <= max(tol * ||b||, atol)`` (float64 arithmetic); an inconsistent
    singular system therefore reports ``converged=False`` and warns.

    Returns:
        A :class:`~second.SolveResult` with ``info["eigenvalues"]`` (float64) and
        ``negative_curvature`` set when the matrix has a negative eigenvalue.

    Example:
        >>> res = dense(torch.tensor([[2.0, 0.0], [0.0, -4.0]]), torch.tensor([1.0, 1.0]))
        >>> res.x, res.negative_curvature
        (tensor([ 0.5000, -0.2500]), True)
    """
    pb = Problem(A, b, None, damping)
    Ad = pb.A.to_dense(chunk_size=chunk_size).to(torch.float64)
    Ad = 0.5 * (Ad + Ad.T) if pb.A.symmetric else Ad
    b64 = pb.b.to(torch.float64)
    n = pb.n
    if pb.A.symmetric:
        evals, evecs = torch.linalg.eigh(Ad)
        scale = float(evals.abs().max()) if n else 0.0
        default_rcond = max(n * torch.finfo(torch.float64).eps, torch.finfo(pb.A.dtype).eps)
        cut = (rcond if rcond is not None else default_rcond) * scale
        small = evals.abs() <= cut
        inv = torch.where(small, torch.zeros_like(evals), 1.0 / evals)
        x = evecs @ (inv * (evecs.T @ b64))
        info = {"eigenvalues": evals, "rank": int((~small).sum())}
        neg = bool((evals < -cut).any())
    else:
        x = torch.linalg.lstsq(Ad, b64.unsqueeze(1)).solution.squeeze(1)
        info, neg, small = {}, False, torch.zeros(1, dtype=torch.bool)
    rnorm = _norm(b64 - Ad @ x)
    threshold = stopping_threshold(_norm(b64), tol, atol)
    converged = rnorm <= threshold
    if bool(small.any()):
        msg = (
            f"the matrix is singular to working precision ({int(small.sum())} eigenvalues "
            f"below {cut:.2e}): returned the minimum-norm least-squares solution, "
            f"||r|| = {rnorm:.3e}"
            + (
                ""
                if converged
                else f" > {threshold:.3e}: b is not in the range of A (inconsistent system)"
            )
        )
    else:
        msg = f"direct solve: ||r|| = {rnorm:.3e}"
        if not converged:
            msg += f" > {threshold:.3e} (ill-conditioned)"
    info["warn_negative"] = False
    res = pb.result(
        x,
        converged=converged,
        iterations=1,
        residual_norms=[_norm(b64), rnorm],
        negative_curvature=neg,
        message=msg,
        method="dense",
        info=info,
    )
    return report(res, warn)
