"""A free symmetry probe: the projected matrix of a basis and its products must be symmetric.

Lanczos, eigsh, XTrace and XDiag assume a symmetric operator. A SciPy operator or a plain
callable is declared symmetric when wrapped (nothing says otherwise), so a nonsymmetric one
would give confident wrong answers. The products these methods keep already hold the test:
for orthonormal ``u``, ``v``, ``u^T A v - v^T A u`` is zero for a symmetric ``A`` up to the
products' rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..func.inner import gram

__all__ = ["PROBE_COLUMNS", "symmetry_rtol", "check_symmetric_pair", "check_symmetric_basis"]

PROBE_COLUMNS = 16
"""Basis columns :func:`check_symmetric_basis` compares (a few random directions suffice)."""


def symmetry_rtol(dtype: torch.dtype) -> float:
    """The asymmetry, relative to ``||A u||``, beyond which an operator is not symmetric.

    ``eps(dtype) ** (1/3)`` (6e-6 in float64, 5e-3 in float32): far above the rounding of a
    product (a Hessian-vector product by double backpropagation included), far below the
    asymmetry of a matrix that is not symmetric.
    """
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def check_symmetric_pair(
    asymmetry: float, scale: float, dtype: torch.dtype, what: str, instead: str = ""
) -> None:
    """Raise ``ValueError`` if ``|u^T A v - v^T A u|`` exceeds :func:`symmetry_rtol` of ``scale``.

    ``scale`` bounds ``|u^T A v|`` for the unit vectors compared (the norm of ``A v``);
    ``instead`` names what works for a general matrix.
    """
    if dtype.is_complex or not asymmetry > symmetry_rtol(dtype) * scale:
        return
    raise ValueError(
        f"{what} needs a symmetric operator, and this one is not: for orthonormal u, v, "
        f"|u^T A v - v^T A u| = {asymmetry:.3g} against products of norm {scale:.3g} (more "
        f"than {symmetry_rtol(dtype):.0e} of it, far above rounding). A SciPy operator or a "
        "callable is taken as symmetric when wrapped unless declared otherwise "
        "(aslinearoperator(A, symmetric=False)); symmetrize it ((A + A^T) / 2)"
        + (f", or use {instead}" if instead else "")
    )


def check_symmetric_basis(
    Q: Tensor, AQ: Tensor, what: str, dtype: torch.dtype, instead: str = ""
) -> None:
    """Raise ``ValueError`` if ``Q^T A Q`` (orthonormal ``Q``, products ``AQ``) is not symmetric.

    Only the first :data:`PROBE_COLUMNS` columns are compared: ``n m^2`` flops for those
    ``m``, and no product.
    """
    if Q.shape[1] < 2 or dtype.is_complex:
        return
    Q, AQ = Q[:, :PROBE_COLUMNS], AQ[:, :PROBE_COLUMNS]
    C = gram(Q, AQ)
    asymmetry = float((C - C.mT).abs().max())
    scale = float(torch.linalg.vector_norm(AQ, dim=0, dtype=torch.float64).max())
    check_symmetric_pair(asymmetry, scale, dtype, what, instead)
