"""Lanczos tridiagonalization and the eigenvalue routines built on it."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..func.inner import gram, project_off
from ..operators.base import LinearOperator, aslinearoperator
from ._symmetry import check_symmetric_pair

__all__ = ["lanczos", "extreme_eigenvalues", "tridiagonal"]


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
            previous vectors, which keeps Ritz values free of spurious copies. Inner
            products are accumulated in float64 (:func:`second.func.inner.gram`).

    Returns:
        ``(alpha, beta, Q)``: the diagonal (float64, ``k``), off-diagonal (float64,
        ``k - 1``) and the basis ``Q`` (``n x k``, operator dtype), ``k <= m`` (fewer when
        an invariant subspace is found).
    """
    return _lanczos(A, v0, m, reorthogonalize=reorthogonalize)


def _lanczos(
    A: LinearOperator, v0: Tensor, m: int, *, reorthogonalize: bool = True, check: str = ""
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lanczos`; with ``check`` (the caller's name), a symmetry probe at every step.

    For a symmetric ``A``, ``q_{j-1}^T A q_j`` is the ``beta_{j-1} = q_j^T A q_{j-1}`` already
    found: one inner product per step compares them, and a ``ValueError`` (naming ``check``)
    reports an operator that is clearly not symmetric.
    """
    n = A.shape[0]
    m = min(int(m), n)
    if check and not getattr(A, "symmetric", True):
        raise ValueError(f"{check} needs a symmetric operator; this one declares symmetric=False")
    Q = torch.zeros((n, m), dtype=A.dtype, device=A.device)
    alphas, betas = [], []
    q = v0 / _norm(v0)
    q_prev = torch.zeros_like(q)
    beta_prev = 0.0
    anorm = 0.0
    for j in range(m):
        Q[:, j] = q
        w = A @ q
        if check and j > 0:  # q_{j-1}^T A q_j against q_j^T A q_{j-1} = beta_{j-1}
            c = float(gram(Q[:, j - 1 : j], w[:, None]))
            scale = max(anorm, abs(c), beta_prev)
            check_symmetric_pair(abs(c - beta_prev), scale, A.dtype, check)
        alpha = float(gram(q[:, None], w[:, None]))
        alphas.append(alpha)
        w = w - alpha * q - beta_prev * q_prev
        if reorthogonalize:
            Qj = Q[:, : j + 1]
            for _ in range(2):
                w = project_off(w, Qj)
        beta = _norm(w)
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


def _norm(v: Tensor) -> float:
    """``||v||`` accumulated in float64 (a float32 sum over many entries is good to ~1e-4)."""
    return math.sqrt(float(gram(v[:, None], v[:, None])))


def tridiagonal(alpha: Tensor, beta: Tensor) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alpha`` and off-diagonal ``beta``."""
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def extreme_eigenvalues(
    A, *, steps: int = 30, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Cheap estimates ``(lambda_min, lambda_max)`` from ``steps`` Lanczos iterations.

    Ritz values lie inside the spectrum: the estimate of ``lambda_max`` is a lower bound
    and that of ``lambda_min`` an upper bound, both converging fast at the ends.

    Raises:
        ValueError: an operator that declares itself nonsymmetric, or one that is clearly
            not symmetric (a probe at every step, from the products Lanczos takes anyway).
    """
    from .. import distributed as dist

    op = aslinearoperator(A)
    dist.check_same_values_across_ranks(
        "the generator's state",
        op,
        generator,
        hint="The operator's products are summed over the ranks, so every rank must start "
        "from the same vector: seed the generator alike on every rank (not with the rank).",
    )
    g = generator or torch.Generator(device=op.device).manual_seed(0)
    v0 = torch.randn(op.shape[0], generator=g, dtype=op.dtype, device=op.device)
    alpha, beta, _ = _lanczos(op, v0, steps, check="extreme_eigenvalues")
    theta = torch.linalg.eigvalsh(tridiagonal(alpha, beta))
    return float(theta[0]), float(theta[-1])
