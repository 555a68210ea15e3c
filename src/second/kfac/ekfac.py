"""EK-FAC: KFAC's Kronecker eigenbasis with eigenvalues re-fitted to the data."""

from __future__ import annotations

from torch import Tensor

from .. import distributed as dist
from ..operators.base import LinearOperator
from .correction import eigen_corrections
from .damping import check_damping
from .inverse import EKFACInverseOperator, _inverse_damping
from .operators import KFACOperator

__all__ = ["EKFACOperator"]


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC: KFAC's eigenbasis with re-fitted eigenvalues.

    .. math::

        B \approx (Q_A \otimes Q_G)\,\mathrm{diag}(s)\,(Q_A \otimes Q_G)^\top + \lambda I,\qquad
        s = w \sum_{i,k} \big(\mathrm{vec}(Q_G^\top \nabla_{W} (s_{ik}^\top f_i)\, Q_A)\big)^2,

    the second moments of the per-example gradients in the Kronecker eigenbasis
    (George et al. 2018; :mod:`second.kfac.correction`). With the same Fisher type,
    :math:`s` is the diagonal of the exact block in that basis, so EK-FAC is the
    Frobenius-closest matrix with KFAC's eigenvectors and at least as accurate as KFAC.
    Costs a second pass over the data. Arguments as :class:`KFACOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
        >>> E = EKFACOperator(model, torch.nn.MSELoss(), (X, y))
        >>> E.to_dense().shape
        torch.Size([8, 8])
    """

    def refresh(self) -> None:
        """Recompute factors, eigenbases and the corrected eigenvalues (two data passes)."""
        super().refresh()
        kfac = self.eigen()
        sums = eigen_corrections(
            self.rules, kfac, self._passes(), distributed=dist.active(self.distributed)
        )
        w = self._mean_scale / self.num_data if self.reduction == "mean" else 1.0
        self.scales = [s * w for s in sums]
        self._eigen = [e.with_eigenvalues(s) for e, s in zip(kfac, self.scales)]

    def _matmat(self, V: Tensor) -> Tensor:
        lam, blocks = self.damping, self.eigen()
        return self.layout.apply(
            V,
            lambda j, M: blocks[j].matmul(M, lam),
            lambda i, v: self.diagonals[i].matmul(v, lam),
        )

    def inverse(  # type: ignore[override]  # as KFACOperator.inverse
        self, damping: float | None = None, *, pi_damping: bool = False
    ) -> LinearOperator:
        r"""``(B + \lambda I)^{-1} = (Q_A\otimes Q_G)\,\mathrm{diag}(s + \lambda)^{-1}(Q_A\otimes Q_G)^\top``.

        Args:
            damping: :math:`\lambda` (default: the operator's own); a given one replaces
                the operator's own, which is deprecated as for :meth:`KFACOperator.inverse`.
            pi_damping: not defined for EK-FAC; ``True`` raises.

        Returns:
            An :class:`EKFACInverseOperator`.

        Raises:
            ValueError: ``pi_damping=True``, negative damping, or singular with zero damping.
        """
        if pi_damping:
            raise ValueError(
                "EK-FAC has no per-factor damping: use the exact damping (pi_damping=False)"
            )
        lam = check_damping(_inverse_damping(self, damping))
        return EKFACInverseOperator(self, lam, "exact")
