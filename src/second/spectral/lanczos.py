"""Lanczos tridiagonalization and the eigenvalue routines built on it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..operators.base import LinearOperator, aslinearoperator

__all__ = ["lanczos", "eigsh", "extreme_eigenvalues"]


def lanczos(
    A: LinearOperator,
    v0: Tensor,
    m: int,
    *,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``m`` steps of Lanczos from ``v0``: :math:`A Q_m \approx Q_m T_m`.

    Args:
        A: symmetric operator.
        v0: starting vector (normalized inside).
        m: number of steps (capped at ``n``).
        reorthogonalize: full re-orthogonalization (twice, Gram-Schmidt) against all
            previous vectors, which keeps Ritz values free of spurious copies.

    Returns:
        ``(alpha, beta, Q)``: the diagonal (float64, ``k``), off-diagonal (float64,
        ``k - 1``) and the basis ``Q`` (``n x k``, operator dtype), ``k <= m`` (fewer when
        an invariant subspace is found).
    """
    n = A.shape[0]
    m = min(int(m), n)
    Q = torch.zeros((n, m), dtype=A.dtype, device=A.device)
    alphas, betas = [], []
    q = v0 / torch.linalg.vector_norm(v0)
    q_prev = torch.zeros_like(q)
    beta_prev = 0.0
    anorm = 0.0
    for j in range(m):
        Q[:, j] = q
        w = A @ q
        alpha = float(torch.dot(q, w))
        alphas.append(alpha)
        w = w - alpha * q - beta_prev * q_prev
        if reorthogonalize:
            Qj = Q[:, : j + 1]
            for _ in range(2):
                w = w - Qj @ (Qj.T @ w)
        beta = float(torch.linalg.vector_norm(w))
        anorm = max(anorm, math.hypot(alpha, beta))
        if j == m - 1:
            break
        if beta <= 100 * torch.finfo(A.dtype).eps * max(anorm, 1e-300):
            break  # invariant subspace
        betas.append(beta)
        q_prev, q = q, w / beta
        beta_prev = beta
    k = len(alphas)
    return (
        torch.tensor(alphas, dtype=torch.float64),
        torch.tensor(betas[: k - 1], dtype=torch.float64),
        Q[:, :k],
    )


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def eigsh(
    A,
    k: int = 6,
    which: str = "LA",
    *,
    ncv: int | None = None,
    tol: float = 1e-6,
    maxiter: int | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor] | Tensor:
    r"""A few eigenpairs of a symmetric operator, by Lanczos with full re-orthogonalization.

    SciPy-shaped. ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic,
    ``"LM"`` largest magnitude, ``"BE"`` both ends (half from each). The Krylov space
    grows (``ncv``, default ``max(2k + 20, 40)``, doubled up to ``maxiter`` products,
    default ``n``) until every wanted Ritz pair has residual
    :math:`\|A y - \theta y\| \le \mathrm{tol} \cdot \max|\theta|`; with ``n`` steps the
    answer is exact.

    Returns:
        ``(eigenvalues, eigenvectors)`` in ascending order of eigenvalue, ``k`` of them
        (eigenvalues only with ``return_eigenvectors=False``); eigenvectors are columns.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> vals = eigsh(A, k=2, which="LA", return_eigenvectors=False)
        >>> torch.allclose(vals, torch.tensor([9.0, 10.0], dtype=torch.float64))
        True
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if which not in ("LA", "SA", "LM", "BE"):
        raise ValueError(f"which must be 'LA', 'SA', 'LM' or 'BE', got {which!r}")
    maxiter = n if maxiter is None else min(int(maxiter), n)
    m = min(n, ncv or max(2 * k + 20, 40), maxiter)
    if v0 is None:
        g = generator or torch.Generator(device=op.device).manual_seed(0)
        v0 = torch.randn(n, generator=g, dtype=op.dtype, device=op.device)
    while True:
        alpha, beta, Q = lanczos(op, v0, m)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        idx = _select(theta, k, which)
        exhausted = Q.shape[1] < m or m >= n
        # residual of Ritz pair i: |beta_m * S[-1, i]|, beta_m estimated from the last column
        last = Q[:, -1]
        r_last = op @ last
        r_last = r_last - Q @ (Q.T @ r_last)
        beta_m = float(torch.linalg.vector_norm(r_last))
        res = (beta_m * S[-1, idx].abs()).tolist()
        scale = max(float(theta.abs().max()), 1e-300)
        if exhausted or all(r <= tol * scale for r in res) or m >= maxiter:
            break
        m = min(2 * m, maxiter)
    vals = theta[idx]
    order = torch.argsort(vals)
    vals = vals[order].to(op.dtype)
    if not return_eigenvectors:
        return vals
    vecs = (Q.to(torch.float64) @ S[:, idx][:, order]).to(op.dtype)
    return vals, vecs


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    n = theta.numel()
    k = min(k, n)
    if which == "LA":
        return torch.arange(n - k, n)
    if which == "SA":
        return torch.arange(0, k)
    if which == "LM":
        return torch.argsort(theta.abs())[n - k :]
    lo = k // 2
    hi = k - lo
    return torch.cat([torch.arange(0, lo), torch.arange(n - hi, n)])


def extreme_eigenvalues(
    A, *, steps: int = 30, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Cheap estimates ``(lambda_min, lambda_max)`` from ``steps`` Lanczos iterations.

    Ritz values lie inside the spectrum: the estimate of ``lambda_max`` is a lower bound
    and that of ``lambda_min`` an upper bound, both converging fast at the ends.
    """
    op = aslinearoperator(A)
    g = generator or torch.Generator(device=op.device).manual_seed(0)
    v0 = torch.randn(op.shape[0], generator=g, dtype=op.dtype, device=op.device)
    alpha, beta, _ = lanczos(op, v0, steps)
    theta = torch.linalg.eigvalsh(_tridiag(alpha, beta))
    return float(theta[0]), float(theta[-1])
