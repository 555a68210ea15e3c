r"""Linear operators made from a dense tensor, a callable or a SciPy operator.

:class:`DenseOperator` wraps a matrix, :class:`CallableOperator` a product function,
:class:`IdentityOperator` is :math:`I`, and :func:`aslinearoperator` turns any of these
(or a SciPy ``LinearOperator``) into a :class:`~second.operators.LinearOperator`.

Symmetry: a matrix is checked; a product function or a SciPy operator cannot be, so it is
*declared* with ``symmetric=True``/``False``, or left undeclared. An undeclared square one is
taken as symmetric (``op.symmetric`` is ``True``, as always: the symmetric-only methods, CG,
MINRES, eigsh, Lanczos, accept it) with ``op.symmetry_known = False``; eigsh, Lanczos and the
XTrace/XDiag estimators compare ``u^T A v`` with ``v^T A u`` on the products they take anyway
and refuse one that is clearly not symmetric. One declared ``symmetric=False`` is refused by
the symmetric-only methods at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..func.vectors import parameters_to_vector
from .base import LinearOperator

__all__ = [
    "DenseOperator",
    "CallableOperator",
    "IdentityOperator",
    "aslinearoperator",
    "is_symmetric",
]


class DenseOperator(LinearOperator):
    """Wraps a dense matrix: square, or rectangular ``m x n`` (then never symmetric).

    ``symmetric`` defaults to what the entries say (:func:`is_symmetric`); ``True`` declares
    a matrix symmetric whose asymmetry is rounding.
    """

    symmetry_known = True  # from the entries, or declared

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
    and ``rmatmat`` give the transposed product.

    ``symmetric`` declares whether the operator is symmetric (Hermitian when complex):
    ``False`` has the symmetric-only methods (CG, MINRES, eigsh, Lanczos, XTrace, XDiag)
    refuse it, ``True`` has them trust it. Undeclared (``None``, the default), a square
    operator given without ``rmatvec`` is taken as symmetric, as before, but
    ``symmetry_known`` is ``False``: eigsh, Lanczos and the estimators probe it on the
    products they take (module docstring); with ``rmatvec``, or rectangular, it is not.

    Example:
        >>> A = torch.tensor([[1.0, 5.0], [0.0, 2.0]], dtype=torch.float64)
        >>> op = CallableOperator(lambda v: A @ v, 2, torch.float64)   # undeclared
        >>> op.symmetric, op.symmetry_known
        (True, False)
        >>> CallableOperator(lambda v: A @ v, 2, torch.float64, symmetric=False).symmetric
        False
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
        # declared, or known from the shape; else taken as symmetric without an rmatvec
        self.symmetry_known = symmetric is not None or not self.is_square
        if symmetric is None:
            symmetric = self.is_square and rmatvec is None
        if symmetric and not self.is_square:
            raise ValueError(f"an operator of shape {self.shape} cannot be symmetric")
        self.symmetric = bool(symmetric)

    @staticmethod
    def _checked(out, rows: int, v: Tensor, what: str) -> Tensor:
        if isinstance(out, (tuple, list)):
            out = parameters_to_vector(out)
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
    symmetry_known = True

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__(n, dtype, device)
        if not self.is_square:
            raise ValueError(f"an identity is square, got shape {self.shape}")

    def _matvec(self, v: Tensor) -> Tensor:
        return v.clone()

    def _matmat(self, V: Tensor) -> Tensor:
        return V.clone()


def aslinearoperator(
    A,
    n: int | None = None,
    *,
    dtype=None,
    device=None,
    symmetric: bool | None = None,
) -> LinearOperator:
    """Turn a :class:`LinearOperator`, a dense tensor, a SciPy operator or a callable into one.

    A callable needs ``n`` (or a shape ``(m, n)``; optionally ``dtype``/``device``, default
    float32/cpu). A rectangular SciPy operator keeps its ``rmatvec``.

    ``symmetric`` declares the symmetry of a callable or a SciPy operator (see
    :class:`CallableOperator`): ``False`` has the symmetric-only methods (CG, MINRES,
    eigsh, Lanczos, XTrace, XDiag) refuse it, and a square SciPy operator then keeps its
    ``rmatvec`` for the transposed product. ``None`` (default) takes a SciPy operator's own
    declaration where it has one (a boolean ``symmetric`` attribute; SciPy's operators carry
    none, ``scipy.sparse.linalg.aslinearoperator`` of a symmetric matrix included), else
    leaves the symmetry unknown: a square operator is taken as symmetric, as before, with
    ``symmetry_known = False``, and the spectral methods probe it on the products they take.
    For a dense tensor it is :class:`DenseOperator`'s (default: what the entries say); a
    :class:`LinearOperator` is returned as it is, and a ``symmetric`` that contradicts its
    own is refused.

    Raises:
        ValueError: a callable without ``n``; ``symmetric=True`` for a rectangular operator;
            a ``symmetric`` that contradicts a :class:`LinearOperator`'s own.
        TypeError: anything else.

    Example:
        >>> op = aslinearoperator(lambda v: 2 * v, 3)
        >>> op.shape, op @ torch.ones(3)
        ((3, 3), tensor([2., 2., 2.]))
        >>> aslinearoperator(lambda v: v.flip(0).cumsum(0), 3, symmetric=False).symmetric
        False
    """
    if isinstance(A, LinearOperator):
        if symmetric is not None and bool(symmetric) != A.symmetric:
            raise ValueError(
                f"symmetric={symmetric!r} contradicts the operator's own "
                f"symmetric={A.symmetric} ({type(A).__name__}); declare the symmetry when "
                "building it"
            )
        return A
    if isinstance(A, Tensor):
        return DenseOperator(A, symmetric=symmetric)
    if hasattr(A, "matvec") and isinstance(getattr(A, "dtype", None), np.dtype):
        sp = A
        # complex operators stay complex (a float64 default dropped their imaginary parts)
        tdtype = dtype or (
            torch.complex128 if np.issubdtype(sp.dtype, np.complexfloating) else torch.float64
        )

        def wrap(g):
            def f(v):
                return torch.as_tensor(g(v.detach().cpu().numpy()), dtype=tdtype, device=v.device)

            return f

        if symmetric is None:
            own = getattr(sp, "symmetric", None)  # a declaration, where the operator has one
            symmetric = bool(own) if isinstance(own, (bool, np.bool_)) else None
        # a square operator is taken as symmetric (its own adjoint) unless declared otherwise
        keep_rmatvec = sp.shape[0] != sp.shape[1] or (symmetric is not None and not symmetric)
        return CallableOperator(
            wrap(sp.matvec),
            tuple(sp.shape),
            tdtype,
            device or "cpu",
            symmetric=symmetric,
            rmatvec=wrap(sp.rmatvec) if keep_rmatvec else None,
        )
    if callable(A):
        if n is None:
            raise ValueError("a callable matvec needs the size n")
        return CallableOperator(
            A, n, dtype or torch.get_default_dtype(), device or "cpu", symmetric=symmetric
        )
    raise TypeError(f"cannot make a linear operator from {type(A).__name__}")
