"""Symmetric eigendecomposition of a Kronecker factor, robust to LAPACK failures."""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import NonFiniteError

__all__ = ["sym_eigh"]


def sym_eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition ``(eigenvalues, Q)`` of a symmetric PSD matrix; eigenvalues clamped at 0.

    Computed in the factor's dtype (at least float32) on ``(M + M^T) / 2``; if LAPACK fails to
    converge it is retried in float64, and then with a tiny diagonal shift (removed from
    the eigenvalues afterwards). ``Q`` is returned contiguous, in ``M``'s dtype.

    Raises:
        NonFiniteError: ``M`` has NaN or Inf entries.

    Example:
        >>> lam, Q = sym_eigh(torch.tensor([[2.0, 0.0], [0.0, -1e-9]]))
        >>> lam
        tensor([0., 2.])
    """
    work = M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32
    Mw = M.to(work)
    Mw = 0.5 * (Mw + Mw.T)
    if not bool(torch.isfinite(Mw).all()):
        raise NonFiniteError("a Kronecker factor has NaN or Inf entries")
    try:
        lam, Q = torch.linalg.eigh(Mw)
        return lam.clamp_min(0.0).to(M.dtype), Q.to(M.dtype).contiguous()
    except RuntimeError:
        pass
    M64 = M.to(torch.float64)
    M64 = 0.5 * (M64 + M64.T)
    if not bool(torch.isfinite(M64).all()):
        raise NonFiniteError("a Kronecker factor has NaN or Inf entries")
    try:
        lam, Q = torch.linalg.eigh(M64)
    except RuntimeError:  # ill-conditioned: a tiny diagonal shift makes LAPACK converge
        shift = 1e-12 * float(M64.diagonal().abs().max().clamp_min(1.0))
        lam, Q = torch.linalg.eigh(
            M64 + shift * torch.eye(M64.shape[0], dtype=M64.dtype, device=M64.device)
        )
        lam = lam - shift
    return lam.clamp_min(0.0).to(M.dtype), Q.to(M.dtype).contiguous()  # eigh returns column-major Q
