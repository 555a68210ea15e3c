r"""Matrix-free linear operators and their algebra.

A :class:`LinearOperator` is an ``m x n`` matrix known only through its product
(square ``n x n`` unless a shape ``(m, n)`` is given). ``op @ v`` accepts a flat
vector ``[n]`` or a matrix of ``k`` columns ``[n, k]`` (a batched product, not ``k``
loops, where the subclass supports it). ``op.T`` (:meth:`~LinearOperator.adjoint`)
is the transposed operator, ``n x m``. Operators add, subtract, scale and, when
square, damp (``op + lam * I`` via :meth:`damped`), turn into dense tensors
(:meth:`to_dense`) and into :class:`scipy.sparse.linalg.LinearOperator`
(:meth:`to_scipy`, with ``rmatvec``).

Subclasses implement ``_matvec`` and, for speed, ``_matmat``; a nonsymmetric one also
``_rmatvec`` (``A^H u``) and optionally ``_rmatmat``. The public ``__matmul__``
validates shape, dtype and device and checks the result is finite.

This module holds the type and its algebra (sums, scalings, damping, adjoints); the
operators made from a tensor, a callable or a SciPy operator (:class:`DenseOperator`,
:class:`CallableOperator`, :class:`IdentityOperator`, :func:`aslinearoperator`) are in
:mod:`second.operators.wrap` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..func.dense import dense_from_matmat
from ..func.products import check_finite

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "IdentityOperator",
    "SumOperator",
    "ScaledOperator",
    "DampedOperator",
    "aslinearoperator",
]


class LinearOperator:
    """A linear map known through its product: square ``n x n`` or rectangular ``m x n``.

    ``LinearOperator(n, dtype, device)`` is square; ``LinearOperator((m, n), dtype, device)``
    maps vectors of length ``n`` to vectors of length ``m``. A rectangular operator is never
    symmetric, cannot be damped, and multiplies by its transpose through ``op.T``.

    Attributes:
        shape: ``(m, n)`` (``(n, n)`` when square).
        dtype: dtype of vectors it accepts and returns.
        device: device of those vectors.
        symmetric: whether the operator is known to be symmetric (Hermitian when complex);
            always ``False`` for a rectangular one.
        matvecs: the number of vector products performed with this object (a product with a
            matrix of ``k`` columns counts ``k``); products with ``op.T`` count on ``op.T``.

    Example:
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        >>> A.damped(0.5) @ torch.tensor([1.0, 0.0])            # (A + 0.5 I) e_1
        tensor([2.5000, 1.0000])
        >>> (3 * A - A).to_dense()
        tensor([[4., 2.],
                [2., 6.]])
        >>> A.to_scipy().matvec([0.0, 1.0])
        array([1., 3.], dtype=float32)
        >>> B = DenseOperator(torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]))  # 2 x 3
        >>> B.shape, B.T.shape, B.T @ torch.tensor([1.0, 1.0])
        ((2, 3), (3, 2), tensor([1., 3., 3.]))
    """

    symmetric: bool = True
    psd: bool = False  # known to be positive semi-definite
    check_finite: bool = True

    def __init__(self, n: int | tuple[int, int], dtype: torch.dtype, device: torch.device | str):
        if isinstance(n, (tuple, list, torch.Size)):
            if len(n) != 2:
                raise ValueError(f"an operator's shape is (m, n), got {tuple(n)}")
            rows, cols = int(n[0]), int(n[1])
        else:
            rows = cols = int(n)
        if rows < 0 or cols < 0:
            raise ValueError(f"an operator's shape cannot be negative, got {(rows, cols)}")
        self.shape = (rows, cols)
        self.dtype = dtype
        self.device = torch.device(device)
        self.matvecs = 0  # number of vector products performed (a matmat of k counts k)
        self._adjoint: LinearOperator | None = None
        if rows != cols:
            self.symmetric = False
            self.psd = False

    @property
    def is_square(self) -> bool:
        """Whether the operator is square (``m == n``)."""
        return self.shape[0] == self.shape[1]

    # -- to be provided by subclasses --------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _rmatvec(self, u: Tensor) -> Tensor:
        """``A^H u``: a symmetric (Hermitian) operator is its own adjoint."""
        if self.symmetric and self.is_square:
            return self._matvec(u)
        raise NotImplementedError(
            f"{type(self).__name__} is not symmetric and does not implement the transposed "
            "product A^T u (_rmatvec)"
        )

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self.symmetric and self.is_square:
            return self._matmat(U)
        return torch.stack([self._rmatvec(U[:, j]) for j in range(U.shape[1])], dim=1)

    # -- public product ----------------------------------------------------------------
    def __matmul__(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            return NotImplemented
        self._validate(v)
        if v.dim() == 1:
            out = self._matvec(v)
            self.matvecs += 1
        else:  # a matrix of k columns (k = 0 is an empty product, not an error)
            out = self._matmat(v) if v.shape[1] > 0 else v.new_zeros((self.shape[0], 0))
            self.matvecs += v.shape[1]
        if self.check_finite:
            check_finite(out, f"{type(self).__name__} product")
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a flat vector."""
        return self @ v

    def matmat(self, V: Tensor) -> Tensor:
        """``A V`` for an ``n x k`` matrix."""
        return self @ V

    def rmatvec(self, u: Tensor) -> Tensor:
        """``A^H u`` (``A^T u`` when real) for a flat vector of length ``m``."""
        return self.adjoint() @ u

    def rmatmat(self, U: Tensor) -> Tensor:
        """``A^H U`` for an ``m x k`` matrix."""
        return self.adjoint() @ U

    __call__ = matvec

    # -- transposition -------------------------------------------------------------------
    def adjoint(self) -> LinearOperator:
        r"""The adjoint :math:`A^H` (the transpose :math:`A^\top` when real), an ``n x m`` operator.

        A symmetric (Hermitian) square operator is its own adjoint and returns itself; any
        other multiplies through its ``_rmatvec``. The adjoint is built once and kept, so its
        ``matvecs`` accumulate.

        Example:
            >>> A = DenseOperator(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
            >>> A.adjoint() @ torch.tensor([1.0, 0.0]), A.T.T is A
            (tensor([1., 2.]), True)
        """
        if self.symmetric and self.is_square:
            return self
        adjoint: LinearOperator | None = getattr(self, "_adjoint", None)
        if adjoint is None:
            adjoint = self._adjoint = _AdjointOperator(self, conjugate=True)
        return adjoint

    @property
    def T(self) -> LinearOperator:
        r"""The transposed operator :math:`A^\top` (:meth:`adjoint` for real dtypes)."""
        if not self.dtype.is_complex:
            return self.adjoint()
        return _AdjointOperator(self, conjugate=False)

    @property
    def H(self) -> LinearOperator:
        """The adjoint :math:`A^H`, see :meth:`adjoint`."""
        return self.adjoint()

    def _validate(self, v: Tensor) -> None:
        n = self.shape[1]
        if v.dim() not in (1, 2) or v.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__} of shape {self.shape} cannot multiply a tensor of shape "
                f"{tuple(v.shape)}: expected [{n}] or [{n}, k]"
            )
        if v.dtype != self.dtype:
            raise TypeError(f"vector has dtype {v.dtype}, the operator works in {self.dtype}")
        if v.device != self.device:
            raise ValueError(f"vector is on {v.device}, the operator on {self.device}")

    # -- algebra -------------------------------------------------------------------------
    def __add__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([self, other])

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        if not isinstance(other, LinearOperator):
            return NotImplemented
        return SumOperator([self, ScaledOperator(other, -1.0)])

    def __mul__(self, alpha: float) -> LinearOperator:
        if isinstance(alpha, Tensor) and alpha.numel() == 1:
            alpha = float(alpha)
        if not isinstance(alpha, (int, float)):
            return NotImplemented
        return ScaledOperator(self, float(alpha))

    __rmul__ = __mul__

    def __truediv__(self, alpha: float) -> LinearOperator:
        return self * (1.0 / float(alpha))

    def __neg__(self) -> LinearOperator:
        return ScaledOperator(self, -1.0)

    def damped(self, damping: float) -> LinearOperator:
        """The explicit Tikhonov-damped operator ``A + damping * I`` (square operators only)."""
        return DampedOperator(self, damping)

    def inverse(self, method: str = "auto", **options) -> LinearOperator:
        r"""The operator :math:`(A + \lambda I)^{-1}`, applied by a solver on every product.

        ``A.inverse(method, damping=..., tol=..., ...)`` takes the options of
        :func:`second.solve`; ``@`` on an ``n x k`` matrix solves all ``k`` right-hand sides
        together (one batched product per iteration). See
        :class:`second.solvers.InverseOperator`.
        """
        from ..solvers import InverseOperator

        return InverseOperator(self, method=method, **options)

    # -- conversions ---------------------------------------------------------------------
    def to_dense(self, chunk_size: int | None = 256) -> Tensor:
        """The ``m x n`` matrix, assembled with batched products of ``chunk_size`` columns."""
        return dense_from_matmat(
            self.matmat,
            self.matvec,
            self.shape,
            dtype=self.dtype,
            device=self.device,
            chunk_size=chunk_size,
        )

    def to_scipy(self, dtype: np.dtype | type | None = None):
        """A :class:`scipy.sparse.linalg.LinearOperator` backed by this operator.

        NumPy vectors are converted to tensors on the operator's device and back; ``rmatvec``
        and ``rmatmat`` multiply by :meth:`adjoint`.
        """
        from scipy.sparse.linalg import LinearOperator as SciPyOperator

        np_dtype = np.dtype(dtype) if dtype is not None else _numpy_dtype(self.dtype)

        def product(op: LinearOperator, flat: bool):
            def f(x):
                x = np.asarray(x)
                if np.iscomplexobj(x) and not self.dtype.is_complex:
                    # a real operator on a complex vector, as SciPy's own operators take it
                    # (cast to the operator's dtype, the imaginary part was dropped)
                    return f(x.real) + 1j * f(x.imag)
                t = torch.as_tensor(
                    x.reshape(-1) if flat else x, dtype=self.dtype, device=self.device
                )
                return (op @ t).detach().cpu().numpy().astype(np_dtype, copy=False)

            return f

        adj = self.adjoint()
        return SciPyOperator(
            self.shape,
            matvec=product(self, True),
            rmatvec=product(adj, True),
            matmat=product(self, False),
            rmatmat=product(adj, False),
            dtype=np_dtype,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).replace("torch.", ""))


class SumOperator(LinearOperator):
    """``A_1 + A_2 + ...``, what ``op1 + op2`` and ``op1 - op2`` build."""

    def __init__(self, ops: Sequence[LinearOperator]):
        ops = list(ops)
        first = ops[0]
        for op in ops[1:]:
            if op.shape != first.shape or op.dtype != first.dtype or op.device != first.device:
                raise ValueError(f"cannot add {first!r} and {op!r}: shape, dtype or device differ")
        super().__init__(first.shape, first.dtype, first.device)
        self.ops = ops
        self.symmetric = all(op.symmetric for op in ops)
        self.psd = all(op.psd for op in ops)

    def _matvec(self, v: Tensor) -> Tensor:
        return _sum(op._matvec(v) for op in self.ops)

    def _matmat(self, V: Tensor) -> Tensor:
        return _sum(op._matmat(V) for op in self.ops)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return _sum(op._rmatvec(u) for op in self.ops)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return _sum(op._rmatmat(U) for op in self.ops)


def _sum(parts: Iterable[Tensor]) -> Tensor:
    """The sum of one or more tensors (``sum()``, typed: its start ``0`` is never returned)."""
    total, *rest = parts
    for part in rest:
        total = total + part
    return total


class ScaledOperator(LinearOperator):
    """``alpha * A``, what ``alpha * op`` and ``op / alpha`` build."""

    def __init__(self, op: LinearOperator, alpha: float):
        super().__init__(op.shape, op.dtype, op.device)
        self.op, self.alpha = op, float(alpha)
        self.symmetric = op.symmetric
        self.psd = op.psd and self.alpha >= 0

    def _matvec(self, v: Tensor) -> Tensor:
        return self.alpha * self.op._matvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.alpha * self.op._matmat(V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.alpha * self.op._rmatvec(u)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.alpha * self.op._rmatmat(U)


class DampedOperator(LinearOperator):
    """The Tikhonov-damped operator ``A + damping * I`` (damping kept explicit).

    Example:
        >>> A = DenseOperator(torch.diag(torch.tensor([0.0, 2.0])))
        >>> B = A.damped(0.5)                                  # DampedOperator(A, 0.5)
        >>> B @ torch.ones(2), B.damping, B.damped(0.5).damping
        (tensor([0.5000, 2.5000]), 0.5, 1.0)
    """

    def __init__(self, op: LinearOperator, damping: float):
        if not np.isfinite(damping):
            raise ValueError(f"damping must be finite, got {damping}")
        if op.shape[0] != op.shape[1]:
            raise ValueError(f"only a square operator can be damped, this one is {op.shape}")
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.damping = op, float(damping)
        self.symmetric = op.symmetric
        self.psd = op.psd and self.damping >= 0

    def _matvec(self, v: Tensor) -> Tensor:
        return self.op._matvec(v) + self.damping * v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._matmat(V) + self.damping * V

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self.op._rmatvec(u) + self.damping * u

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.op._rmatmat(U) + self.damping * U

    def damped(self, damping: float) -> LinearOperator:  # noqa: D102
        return DampedOperator(self.op, self.damping + damping)


class _AdjointOperator(LinearOperator):
    """``A^H`` (``conjugate=True``) or ``A^T`` of an operator, through its ``_rmatvec``.

    What :meth:`LinearOperator.adjoint` and :attr:`LinearOperator.T` return; the transpose
    of a complex operator is ``conj(A^H conj(u))``.
    """

    def __init__(self, op: LinearOperator, conjugate: bool = True):
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device)
        self.op, self.conjugate = op, conjugate
        self.symmetric = op.symmetric
        self.psd = op.psd
        self.check_finite = op.check_finite

    def _flip(self, f, v: Tensor) -> Tensor:
        if self.conjugate or not v.is_complex():
            return f(v)
        return f(v.conj()).conj()

    def _matvec(self, v: Tensor) -> Tensor:
        return self._flip(self.op._rmatvec, v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._flip(self.op._rmatmat, V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self._flip(self.op._matvec, u)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._flip(self.op._matmat, U)

    def adjoint(self) -> LinearOperator:  # noqa: D102
        return self.op if self.conjugate else super().adjoint()

    @property
    def T(self) -> LinearOperator:  # noqa: D102
        return self.op if (self.conjugate != self.dtype.is_complex) else super().T


# the operators made from tensors and callables (they need LinearOperator, defined above)
from .wrap import (  # noqa: E402
    CallableOperator,
    DenseOperator,
    IdentityOperator,
    aslinearoperator,
)
