r"""Linear operators made from a dense tensor, a callable or a SciPy operator.

:class:`DenseOperator` wraps a matrix, :class:`CallableOperator` a product function,
:class:`IdentityOperator` is :math:`I`, and :func:`aslinearoperator` turns any of these
(or a SciPy ``LinearOperator``) into a :class:`~second.operators.LinearOperator`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .base import LinearOperator

__all__ = [
    "DenseOperator",
    "CallableOperator",
    "IdentityOperator",
    "aslinearoperator",
    "is_symmetric",
]


class DenseOperator(LinearOperator):
    """Wraps a dense matrix: square, or rectangular ``m x n`` (then never symmetric)."""

    def __init__(self, A: Tensor, symmetric: bool | None = None):
        if A.dim() != 2:
            raise ValueError(f"a dense operator needs a matrix, got shape {tuple(A.shape)}")
        super().__init__((A.shape[0], A.shape[1]), A.dtype, A.device)
        self.A = A
        if not self.is_square:
            if symmetric:
                raise ValueError(f"a {tuple(A.shape)} matrix cannot be symmetric")
            return
        self.symmetric = is_symmetric(A) if symmetric is None else bool(symmetric)

    def _matvec(self, v: Tensor) -> Tensor:
        return self.A @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.A.mH @ u

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.A.mH @ U

    def to_dense(self, chunk_size: int | None = None) -> Tensor:  # noqa: D102
        return self.A.clone()


def is_symmetric(A: Tensor) -> bool:
    r"""Whether a square matrix is symmetric (Hermitian when complex) to rounding.

    The test is :math:`\max|A - A^H| \le 10 \sqrt{n}\, \varepsilon \max|A|`: the asymmetry
    that rounding in a sum of ``n`` products leaves, and no more. A matrix that is off by
    more (one entry perturbed by ``1e-6`` in float64, say) is not symmetric; declare it with
    ``DenseOperator(A, symmetric=True)`` to have it treated as such (the solvers still check
    their residual against ``A`` itself).
    """
    if A.numel() == 0:
        return True
    scale = float(A.abs().max())
    if scale == 0.0:
        return True
    eps = torch.finfo(A.real.dtype if A.is_complex() else A.dtype).eps
    gap = float((A - A.mH).abs().max())
    return gap <= 10.0 * math.sqrt(A.shape[0]) * eps * scale


class CallableOperator(LinearOperator):
    """Wraps a matvec callable ``f(v) -> A v`` on flat vectors of length ``n``.

    ``n`` may be a shape ``(m, n)`` for a rectangular operator. ``rmatvec`` (``u -> A^H u``)
    and ``rmatmat`` give the transposed product. ``symmetric`` defaults to ``True`` for a
    square operator given without ``rmatvec`` (as before), ``False`` otherwise.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int | tuple[int, int],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        matmat: Callable[[Tensor], Tensor] | None = None,
        symmetric: bool | None = None,
        rmatvec: Callable[[Tensor], Tensor] | None = None,
        rmatmat: Callable[[Tensor], Tensor] | None = None,
    ):
        super().__init__(n, dtype, device)
        self._f = matvec
        self._fm = matmat
        self._rf = rmatvec
        self._rfm = rmatmat
        if symmetric is None:
            symmetric = self.is_square and rmatvec is None
        if symmetric and not self.is_square:
            raise ValueError(f"an operator of shape {self.shape} cannot be symmetric")
        self.symmetric = bool(symmetric)

    @staticmethod
    def _checked(out, rows: int, v: Tensor, what: str) -> Tensor:
        if isinstance(out, (tuple, list)):
            out = torch.cat([t.reshape(-1) for t in out])
        if out.shape != (rows, *v.shape[1:]):
            raise ValueError(
                f"the {what} returned shape {tuple(out.shape)} for input {tuple(v.shape)}, "
                f"expected {(rows, *v.shape[1:])}"
            )
        return out

    def _matvec(self, v: Tensor) -> Tensor:
        return self._checked(self._f(v), self.shape[0], v, "matvec")

    def _matmat(self, V: Tensor) -> Tensor:
        if self._fm is not None:
            return self._fm(V)
        return super()._matmat(V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        if self._rf is None:
            return super()._rmatvec(u)
        return self._checked(self._rf(u), self.shape[1], u, "rmatvec")

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self._rfm is not None:
            return self._rfm(U)
        return super()._rmatmat(U)


class IdentityOperator(LinearOperator):
    """The identity ``I`` of size ``n``: ``IdentityOperator(n, dtype, device)``."""

    psd = True

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__(n, dtype, device)
        if not self.is_square:
            raise ValueError(f"an identity is square, got shape {self.shape}")

    def _matvec(self, v: Tensor) -> Tensor:
        return v.clone()

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


def aslinearoperator(A, n: int | None = None, *, dtype=None, device=None) -> LinearOperator:
    """Turn a :class:`LinearOperator`, a dense tensor, a SciPy operator or a callable into one.

    A callable needs ``n`` (or a shape ``(m, n)``; optionally ``dtype``/``device``, default
    float32/cpu). A rectangular SciPy operator keeps its ``rmatvec``.

    Example:
        >>> op = aslinearoperator(lambda v: 2 * v, 3)
        >>> op.shape, op @ torch.ones(3)
        ((3, 3), tensor([2., 2., 2.]))
    """
    if isinstance(A, LinearOperator):
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A)
    if hasattr(A, "matvec") and isinstance(getattr(A, "dtype", None), np.dtype):
        sp = A
        tdtype = dtype or torch.float64

        def wrap(g):
            def f(v):
                return torch.as_tensor(g(v.detach().cpu().numpy()), dtype=tdtype, device=v.device)

            return f

        if sp.shape[0] == sp.shape[1]:  # square: symmetric as before (declare it otherwise)
            return CallableOperator(wrap(sp.matvec), sp.shape[0], tdtype, device or "cpu")
        return CallableOperator(
            wrap(sp.matvec), tuple(sp.shape), tdtype, device or "cpu", rmatvec=wrap(sp.rmatvec)
        )
    if callable(A):
        if n is None:
            raise ValueError("a callable matvec needs the size n")
        return CallableOperator(A, n, dtype or torch.get_default_dtype(), device or "cpu")
    raise TypeError(f"cannot make a linear operator from {type(A).__name__}")
