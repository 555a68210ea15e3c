r"""Preconditioners for the Newton core's CG: an L-BFGS quasi-Newton one and a diagonal one.

A preconditioner is any callable ``r -> M r`` with :math:`M \approx H^{-1}` symmetric
positive definite; :func:`~second.newton.truncated_cg` and
:func:`~second.newton.steihaug_cg` take it as ``M``. KFAC-type approximations plug into
the same hook (their inverse operator's ``matvec``).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor

__all__ = ["LBFGSPreconditioner", "diagonal_preconditioner"]


class LBFGSPreconditioner:
    r"""The L-BFGS inverse-Hessian approximation as a CG preconditioner (Morales & Nocedal 2000).

    Holds the last ``memory`` pairs :math:`(s_i, y_i)` (steps and gradient changes, or
    :math:`(p, Hp)` pairs from CG) with :math:`s_i^\top y_i > \epsilon \|s_i\| \|y_i\|`
    (others are skipped, which keeps :math:`M` positive definite), and applies
    :math:`M r` by the two-loop recursion with the initial scaling
    :math:`\gamma = s^\top y / y^\top y` of the newest pair. Without pairs it is the identity.
    The directions it learns are the ones the iteration has been travelling along, which on
    an ill-conditioned problem are the low-curvature ones CG resolves last.

    Args:
        memory: pairs kept (default 10).
        eps: curvature-condition threshold (default 1e-10).

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 100.0], dtype=torch.float64))
        >>> M = LBFGSPreconditioner()
        >>> for s in torch.eye(2, dtype=torch.float64):
        ...     _ = M.update(s, A @ s)
        >>> torch.allclose(M(A @ torch.ones(2, dtype=torch.float64)), torch.ones(2, dtype=torch.float64))
        True

    References:
        Nocedal (1980); Morales & Nocedal (2000), *Automatic preconditioning by limited memory
        quasi-Newton updating*, SIAM J. Optim. 10(4).
    """

    def __init__(self, memory: int = 10, eps: float = 1e-10):
        if not isinstance(memory, int) or memory < 1:
            raise ValueError(f"memory must be an integer >= 1, got {memory!r}")
        self.memory = memory
        self.eps = eps
        self.pairs: deque[tuple[Tensor, Tensor, float]] = deque(maxlen=memory)
        # the initial scaling of the pairs as they stand, and the newest pair it was taken from
        self._newest: tuple[Tensor, Tensor, float] | None = None
        self._size = 0
        self._gamma = 1.0

    def update(self, s: Tensor, y: Tensor) -> bool:
        """Add a pair; returns whether it passed the curvature condition."""
        return self._update(s, y, copy=True)

    def _update(self, s: Tensor, y: Tensor, copy: bool) -> bool:
        """:meth:`update`; ``copy=False`` keeps ``s`` and ``y`` themselves.

        For tensors without a graph that no one changes afterwards (the Newton core's step
        and gradient change).
        """
        sy = float(torch.dot(s, y))
        if not sy > self.eps * float(torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)):
            return False
        if copy or s.requires_grad or y.requires_grad:
            s, y = s.detach().clone(), y.detach().clone()
        self.pairs.append((s, y, 1.0 / sy))
        return True

    def __len__(self) -> int:
        return len(self.pairs)

    def __call__(self, r: Tensor) -> Tensor:
        """``M r`` by the two-loop recursion (``r`` itself without pairs)."""
        pairs = self.pairs
        if not pairs:
            return r.clone()
        newest = pairs[-1]
        if newest is not self._newest or len(pairs) != self._size:
            # new pairs: the initial scaling 1 / (rho y^T y) = s^T y / y^T y of the newest
            s, y, rho = newest
            self._newest, self._size = newest, len(pairs)
            self._gamma = 1.0 / (rho * float(torch.dot(y, y)))
        dot = torch.dot
        newer = reversed(pairs)
        s, y, rho = next(newer)
        a = rho * float(dot(s, r))
        q = torch.add(r, y, alpha=-a)  # r.clone().add_(y, alpha=-a) in one call
        alphas = [a]
        for s, y, rho in newer:
            a = rho * float(dot(s, q))
            alphas.append(a)
            q.add_(y, alpha=-a)
        q.mul_(self._gamma)
        for (s, y, rho), a in zip(pairs, reversed(alphas)):
            q.add_(s, alpha=a - rho * float(dot(y, q)))
        return q


def diagonal_preconditioner(diagonal: Tensor, *, floor: float = 1e-8):
    r"""The Jacobi preconditioner :math:`M = \mathrm{diag}(\max(|h_{ii}|, \delta))^{-1}`.

    :math:`\delta` = ``floor`` times the largest :math:`|h_{ii}|`, which keeps :math:`M`
    positive definite when the diagonal (e.g. a Hutchinson estimate or a GGN diagonal) has
    zero or negative entries.

    Args:
        diagonal: an estimate of :math:`\mathrm{diag}(H)` (flat).
        floor: relative floor (default 1e-8).

    Returns:
        ``r -> M r``.

    Example:
        >>> M = diagonal_preconditioner(torch.tensor([2.0, -4.0, 0.0], dtype=torch.float64))
        >>> M(torch.ones(3, dtype=torch.float64)).tolist()
        [0.5, 0.25, 25000000.0]
    """
    d = diagonal.detach().abs()
    d = d.clamp_min(floor * float(d.max()) if d.numel() else floor)
    inv = 1.0 / d

    def apply(r: Tensor) -> Tensor:
        return inv.to(r) * r

    return apply
