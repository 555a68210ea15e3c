"""Inner products of lower-precision bases accumulated in float64, a chunk of rows at a time."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GRAM_CHUNK_BYTES", "coefficients", "gram", "project_off", "rows_per_chunk"]

GRAM_CHUNK_BYTES = 64 * 2**20
"""Float64 scratch for the inner products of a lower-precision basis, taken a chunk of rows at
a time: its Gram-Schmidt coefficients, norms, projected matrix and residuals are accumulated
in float64. In float32 a sum over 600k entries is only good to about 1e-4 relative (the basis
was then orthonormal to 7e-4 and a Ritz value 7e-4 off the operator's eigenvalue while its
residual bound claimed 4e-4; at 10M parameters 2e-3); a whole float64 copy of the basis would
cost 8 bytes per entry (3 GB for 40 vectors of 10M)."""


def rows_per_chunk(n_cols: int) -> int:
    """Rows of ``n_cols`` float64 columns that fit in :data:`GRAM_CHUNK_BYTES`."""
    return max(1, GRAM_CHUNK_BYTES // (8 * max(n_cols, 1)))


def gram(A: Tensor, B: Tensor) -> Tensor:
    """``A^T B`` in float64, accumulated over row chunks of a lower-precision ``A``, ``B``."""
    if A.dtype == torch.float64 and B.dtype == torch.float64:
        return A.mT @ B
    out = torch.zeros(A.shape[1], B.shape[1], dtype=torch.float64, device=A.device)
    step = rows_per_chunk(A.shape[1] + B.shape[1])
    for i in range(0, A.shape[0], step):
        out += A[i : i + step].to(torch.float64).mT @ B[i : i + step].to(torch.float64)
    return out


def coefficients(U: Tensor, v: Tensor) -> Tensor:
    """``U^T v`` (``v`` a vector or a block of columns) in ``v``'s dtype, accumulated in float64."""
    c = gram(U, v.reshape(v.shape[0], -1)).to(v.dtype)
    return c.reshape(U.shape[1], *v.shape[1:])


def project_off(v: Tensor, U: Tensor) -> Tensor:
    """``(I - U U^T) v`` for orthonormal columns ``U``, the coefficients accumulated in float64."""
    return v - U @ coefficients(U, v)
