"""Direct solve on the dense matrix, for small problems."""

from __future__ import annotations

import torch

from .._errors import NonFiniteError
from ..func.dense import eigenvalue_cutoff
from ._result import (
    Problem,
    SolveResult,
    column_norms,
    measurable_residual,
    report,
    stopping_threshold,
)

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

    Stopping rule: ``converged`` means the true residual of the returned ``x`` (rounded
    to the operator's dtype) against the matrix the user passed (not a symmetrized copy)
    satisfies ``||b - A x|| <= max(tol * ||b||, atol) + 20 eps ||b||`` (float64
    arithmetic); an inconsistent singular system therefore reports ``converged=False`` and
    warns. An operator that declares itself symmetric (Hermitian) is solved by ``eigh`` of
    its symmetric part; when the residual against the matrix itself then misses, the
    matrix is solved as the general one it is. Complex systems are solved in complex128;
    a matrix of right-hand sides ``b`` (``n x k``) in one factorization.

    Returns:
        A :class:`~second.SolveResult` with ``info["eigenvalues"]`` (float64) and
        ``negative_curvature`` set when the matrix has a negative eigenvalue.

    Raises:
        NonFiniteError: the matrix has NaN or Inf entries.

    Example:
        >>> res = dense(torch.tensor([[2.0, 0.0], [0.0, -4.0]]), torch.tensor([1.0, 1.0]))
        >>> res.x, res.negative_curvature
        (tensor([ 0.5000, -0.2500]), True)
    """
    pb = Problem(A, b, None, damping, method="dense", allow_block=True)
    n = pb.n
    wide = torch.complex128 if pb.dtype.is_complex else torch.float64
    Ad = pb.A.to_dense(chunk_size=chunk_size).to(wide)  # the system as given (+ damping)
    if not bool(torch.isfinite(Ad).all()):  # LAPACK would fail with an internal error
        raise NonFiniteError("dense: the operator's matrix has NaN or Inf entries")
    B = pb.B.to(wide)
    bnorm = column_norms(B)
    thr = torch.tensor(
        [stopping_threshold(float(v), tol, atol) for v in bnorm], dtype=torch.float64
    )
    floor = torch.tensor(
        [measurable_residual(pb.dtype, float(v)) for v in bnorm], dtype=torch.float64
    )

    def residual(X):  # of the x the caller receives, against the matrix itself
        return column_norms(B - Ad @ X.to(pb.dtype).to(wide))

    info: dict = {}
    neg, n_small, cut = False, 0, 0.0
    if pb.A.symmetric:
        S = 0.5 * (Ad + Ad.mH)
        evals, evecs = torch.linalg.eigh(S)
        cut = eigenvalue_cutoff(evals, n, pb.dtype, rcond)  # second's one pinv policy
        small = evals.abs() <= cut
        inv = torch.where(small, torch.zeros_like(evals), 1.0 / evals).to(wide)
        X = evecs @ (inv.unsqueeze(1) * (evecs.mH @ B))
        info.update(eigenvalues=evals, rank=int((~small).sum()))
        neg, n_small = bool((evals < -cut).any()), int(small.sum())
        r = residual(X)
        if bool((r > thr + floor).any()) and not torch.equal(Ad, Ad.mH):
            # declared symmetric, but the matrix is not quite: solve the matrix itself
            X2 = torch.linalg.lstsq(Ad, B).solution
            r2 = residual(X2)
            if float(r2.max()) < float(r.max()):
                X, r = X2, r2
                info["solved_as"] = "general"
    else:
        X = torch.linalg.lstsq(Ad, B).solution
        r = residual(X)
        info["solved_as"] = "general"
    ok = r <= thr + floor
    converged = bool(ok.all())
    rmax, tmax = float(r.max()), float(thr.max())
    if n_small:
        msg = (
            f"the matrix is singular to working precision ({n_small} eigenvalues below "
            f"{cut:.2e}): returned the minimum-norm least-squares solution, ||r|| = {rmax:.3e}"
            + (
                ""
                if converged
                else f" > {tmax:.3e}: b is not in the range of A (inconsistent system)"
            )
        )
    else:
        msg = f"direct solve: ||r|| = {rmax:.3e}"
        if not converged:
            rel = float((r / bnorm.clamp_min(1e-300)).max())
            msg += (
                f" > {tmax:.3e} (+ rounding floor): relative residual {rel:.1e}; the matrix is "
                f"ill-conditioned for {str(pb.dtype).replace('torch.', '')}"
                + (
                    " (pass float64 for a more accurate x)"
                    if pb.dtype in (torch.float32, torch.complex64, torch.float16, torch.bfloat16)
                    else ""
                )
            )
    info["warn_negative"] = False
    info["true_residual"] = r.tolist() if pb.block else float(r[0])
    if pb.block:
        info["converged_columns"] = ok.tolist()
    res = pb.result(
        X if pb.block else X[:, 0],
        converged=converged,
        iterations=1,
        residual_norms=[float(bnorm.max()), rmax],
        negative_curvature=neg,
        message=msg,
        method="dense",
        info=info,
    )
    return report(res, warn)
