r"""A submatrix of any linear operator, as an operator."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .base import LinearOperator, aslinearoperator

__all__ = ["SubmatrixOperator"]


class SubmatrixOperator(LinearOperator):
    r"""The submatrix :math:`A_{I J}` (``A[rows][:, cols]``) of an operator, matrix-free.

    With :math:`S_I` the ``|I| x m`` matrix that selects the rows :math:`I`,

    .. math:: A_{I J} = S_I A S_J^\top, \qquad A_{I J} v = S_I\, A\, (S_J^\top v),

    so a product embeds ``v`` into a zero vector at ``cols``, multiplies by ``A`` and keeps
    the entries at ``rows``: one product with ``A`` (one batched product for a matrix of
    columns), and ``A_{IJ}^\top u`` is one product with ``A^\top``. Indices may repeat (a
    repeated column index adds up, as in dense indexing). The submatrix is symmetric (and
    positive semi-definite) when ``rows`` and ``cols`` are the same sequence and ``A`` is.
    The block of a curvature matrix for one layer's parameters is one use.

    Args:
        A: a :class:`LinearOperator` (or a dense matrix), ``m x n``.
        row_indices: the rows :math:`I`, a sequence of ints or a 1-D integer tensor, each in
            ``[0, m)``.
        col_indices: the columns :math:`J`, each in ``[0, n)``.

    Raises:
        ValueError: an index out of range, or indices that are not one-dimensional.
        TypeError: indices that are not integers.

    Example:
        >>> A = torch.arange(9.0).reshape(3, 3)          # or any LinearOperator
        >>> S = SubmatrixOperator(A, [0, 2], [1])
        >>> S.shape
        (2, 1)
        >>> S.to_dense()
        tensor([[1.],
                [7.]])
        >>> S.T @ torch.tensor([1.0, 1.0])            # A[[0, 2]][:, [1]].T @ [1, 1]
        tensor([8.])
    """

    def __init__(
        self,
        A: LinearOperator | Tensor,
        row_indices: Sequence[int] | Tensor,
        col_indices: Sequence[int] | Tensor,
    ):
        op = aslinearoperator(A)
        rows = _as_indices(row_indices, op.shape[0], "row", op.device)
        cols = _as_indices(col_indices, op.shape[1], "column", op.device)
        super().__init__((rows.numel(), cols.numel()), op.dtype, op.device)
        self.op, self.row_indices, self.col_indices = op, rows, cols
        same = rows.shape == cols.shape and bool(torch.equal(rows, cols))
        self.symmetric = bool(op.symmetric and same)
        self.psd = bool(op.psd and same)
        self.check_finite = op.check_finite

    def _through(self, product, x: Tensor, adjoint: bool) -> Tensor:
        """``product`` of the parent on ``x`` embedded at the columns (rows for the adjoint)."""
        into, out = (
            (self.row_indices, self.col_indices)
            if adjoint
            else (self.col_indices, self.row_indices)
        )
        full = x.new_zeros((self.op.shape[0 if adjoint else 1], *x.shape[1:]))
        return product(full.index_add_(0, into, x)).index_select(0, out)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._through(self.op._matvec, v, adjoint=False)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._through(self.op._matmat, V, adjoint=False)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self._through(self.op._rmatvec, u, adjoint=True)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._through(self.op._rmatmat, U, adjoint=True)


def _as_indices(indices, size: int, what: str, device: torch.device) -> Tensor:
    idx = torch.as_tensor(indices if isinstance(indices, Tensor) else list(indices))
    if idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{what} indices must be integers, got {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{what} indices must be one-dimensional, got shape {tuple(idx.shape)}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} index {bad} is out of range for {size} {what}s")
    return idx.to(device=device, dtype=torch.long)
