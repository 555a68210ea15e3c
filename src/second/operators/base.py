r"""Matrix-free linear operators and their algebra.

A :class:`LinearOperator` is a square ``n x n`` matrix known only through its
product. ``op @ v`` accepts a flat vector ``[n]`` or a matrix of ``k`` columns
``[n, k]`` (a batched product, not ``k`` loops, where the subclass supports it).
Operators add, subtract, scale and damp (``op + lam * I`` via :meth:`damped`),
turn into dense tensors (:meth:`to_dense`) and into
:class:`scipy.sparse.linalg.LinearOperator` (:meth:`to_scipy`).

Subclasses implement ``_matvec`` and, for speed, ``_matmat``; the public
``__matmul__`` validates shape, dtype and device and checks the result is finite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

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
    "is_symmetric",
]


class LinearOperator:
    """A square linear map known through its product.

    Attributes:
        shape: ``(n, n)``.
        dtype: dtype of vectors it accepts and returns.
        device: device of those vectors.
        symmetric: whether the operator is known to be symmetric.

    Example:
        >>> A = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
        >>> A.damped(0.5) @ torch.tensor([1.0, 0.0])            # (A + 0.5 I) e_1
        tensor([2.5000, 1.0000])
        >>> (3 * A - A).to_dense()
        tensor([[4., 2.],
                [2., 6.]])
        >>> A.to_scipy().matvec([0.0, 1.0])
        array([1., 3.], dtype=float32)
    """

    symmetric: bool = True
    psd: bool = False  # known to be positive semi-definite
    check_finite: bool = True

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device | str):
        self.shape = (int(n), int(n))
        self.dtype = dtype
        self.device = torch.device(device)
        self.matvecs = 0  # number of vector products performed (a matmat of k counts k)

    # -- to be provided by subclasses --------------------------------------------------
    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def _matmat(self, V: Tensor) -> Tensor:
        return torch.stack([self._matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    # -- public product ----------------------------------------------------------------
    def __matmul__(self, v: Tensor) -> Tensor:
        if not isinstance(v, Tensor):
            return NotImplemented
        self._validate(v)
        if v.dim() == 1:
            out = self._matvec(v)
            self.matvecs += 1
        else:  # a matrix of k columns (k = 0 is an empty product, not an error)
            out = self._matmat(v) if v.shape[1] > 0 else v.new_zeros(v.shape)
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

    __call__ = matvec

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
        """The explicit Tikhonov-damped operator ``A + damping * I``."""
        return DampedOperator(self, damping)

    def inverse(self, method: str = "auto", **options) -> LinearOperator:
        r"""The operator :math:`(A + \lambda I)^{-1}`, applied by a solver on every product.

        ``A.inverse(method, damping=..., tol=..., ...)`` takes the options of
        :func:`second.solve`; ``@`` on an ``n x k`` matrix solves all ``k`` right-hand sides
        together (one batched product per iteration). See
        :class:`second.solvers.InverseOperator`.
        """
        from ..solvers._inverse import InverseOperator

        return InverseOperator(self, method=method, **options)

    # -- conversions ---------------------------------------------------------------------
    def to_dense(self, chunk_size: int | None = 256) -> Tensor:
        """The ``n x n`` matrix, assembled with batched products of ``chunk_size`` columns."""
        return dense_from_matmat(
            self.matmat,
            self.matvec,
            self.shape[0],
            dtype=self.dtype,
            device=self.device,
            chunk_size=chunk_size,
        )

    def to_scipy(self, dtype: np.dtype | type | None = None):
        """A :class:`scipy.sparse.linalg.LinearOperator` backed by this operator.

        NumPy vectors are converted to tensors on the operator's device and back.
        """
        from scipy.sparse.linalg import LinearOperator as SciPyOperator

        np_dtype = np.dtype(dtype) if dtype is not None else _numpy_dtype(self.dtype)

        def mv(x):
            t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return (self @ t).detach().cpu().numpy().astype(np_dtype, copy=False)

        def mm(X):
            t = torch.as_tensor(np.asarray(X), dtype=self.dtype, device=self.device)
            return (self @ t).detach().cpu().numpy().astype(np_dtype, copy=False)

        return SciPyOperator(self.shape, matvec=mv, rmatvec=mv, matmat=mm, dtype=np_dtype)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"
        )


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(str(dtype).replace("torch.", ""))


class DenseOperator(LinearOperator):
    """Wraps a dense square matrix."""

    def __init__(self, A: Tensor, symmetric: bool | None = None):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"a dense operator needs a square matrix, got {tuple(A.shape)}")
        super().__init__(A.shape[0], A.dtype, A.device)
        self.A = A
        self.symmetric = is_symmetric(A) if symmetric is None else bool(symmetric)

    def _matvec(self, v: Tensor) -> Tensor:
        return self.A @ v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.A @ V

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
    """Wraps a matvec callable ``f(v) -> A v`` on flat vectors of length ``n``."""

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        n: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        *,
        matmat: Callable[[Tensor], Tensor] | None = None,
        symmetric: bool = True,
    ):
        super().__init__(n, dtype, device)
        self._f = matvec
        self._fm = matmat
        self.symmetric = symmetric

    def _matvec(self, v: Tensor) -> Tensor:
        out = self._f(v)
        if isinstance(out, (tuple, list)):
            out = torch.cat([t.reshape(-1) for t in out])
        if out.shape != v.shape:
            raise ValueError(
                f"the matvec returned shape {tuple(out.shape)} for input {tuple(v.shape)}"
            )
        return out

    def _matmat(self, V: Tensor) -> Tensor:
        if self._fm is not None:
            return self._fm(V)
        return super()._matmat(V)


class IdentityOperator(LinearOperator):
    """The identity ``I`` of size ``n``: ``IdentityOperator(n, dtype, device)``."""

    psd = True

    def _matvec(self, v: Tensor) -> Tensor:
        return v.clone()

    _matmat = _matvec


class SumOperator(LinearOperator):
    """``A_1 + A_2 + ...``, what ``op1 + op2`` and ``op1 - op2`` build."""

    def __init__(self, ops: Sequence[LinearOperator]):
        ops = list(ops)
        first = ops[0]
        for op in ops[1:]:
            if op.shape != first.shape or op.dtype != first.dtype or op.device != first.device:
                raise ValueError(f"cannot add {first!r} and {op!r}: shape, dtype or device differ")
        super().__init__(first.shape[0], first.dtype, first.device)
        self.ops = ops
        self.symmetric = all(op.symmetric for op in ops)
        self.psd = all(op.psd for op in ops)

    def _matvec(self, v: Tensor) -> Tensor:
        return sum(op._matvec(v) for op in self.ops)

    def _matmat(self, V: Tensor) -> Tensor:
        return sum(op._matmat(V) for op in self.ops)


class ScaledOperator(LinearOperator):
    """``alpha * A``, what ``alpha * op`` and ``op / alpha`` build."""

    def __init__(self, op: LinearOperator, alpha: float):
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.alpha = op, float(alpha)
        self.symmetric = op.symmetric
        self.psd = op.psd and self.alpha >= 0

    def _matvec(self, v: Tensor) -> Tensor:
        return self.alpha * self.op._matvec(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self.alpha * self.op._matmat(V)


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
        super().__init__(op.shape[0], op.dtype, op.device)
        self.op, self.damping = op, float(damping)
        self.symmetric = op.symmetric
        self.psd = op.psd and self.damping >= 0

    def _matvec(self, v: Tensor) -> Tensor:
        return self.op._matvec(v) + self.damping * v

    def _matmat(self, V: Tensor) -> Tensor:
        return self.op._matmat(V) + self.damping * V

    def damped(self, damping: float) -> LinearOperator:  # noqa: D102
        return DampedOperator(self.op, self.damping + damping)


def aslinearoperator(A, n: int | None = None, *, dtype=None, device=None) -> LinearOperator:
    """Turn a :class:`LinearOperator`, a dense tensor, a SciPy operator or a callable into one.

    A callable needs ``n`` (and optionally ``dtype``/``device``, default float32/cpu).

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

        def f(v):
            return torch.as_tensor(
                sp.matvec(v.detach().cpu().numpy()), dtype=tdtype, device=v.device
            )

        return CallableOperator(f, sp.shape[0], tdtype, device or "cpu")
    if callable(A):
        if n is None:
            raise ValueError("a callable matvec needs the size n")
        return CallableOperator(A, n, dtype or torch.get_default_dtype(), device or "cpu")
    raise TypeError(f"cannot make a linear operator from {type(A).__name__}")
