"""Rectangular operators: shapes, adjoints, algebra and conversions of ``LinearOperator``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DTYPES, PRODUCT_TOL
from dense_reference import assert_close
from second import (
    CallableOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    aslinearoperator,
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5, 3), (3, 5), (4, 4)], ids=str)
def test_dense_products_adjoint_and_algebra(shape, dtype):
    A64 = torch.randn(*shape, dtype=torch.float64)
    B64 = torch.randn(*shape, dtype=torch.float64)
    A, B = DenseOperator(A64.to(dtype)), DenseOperator(B64.to(dtype))
    tol = PRODUCT_TOL[dtype]
    m, n = shape
    assert A.shape == shape and A.T.shape == (n, m) and A.T.T is A and A.H is A.adjoint()
    assert not A.symmetric
    V, U = torch.randn(n, 3, dtype=torch.float64), torch.randn(m, 2, dtype=torch.float64)
    assert_close(A @ V.to(dtype), A64 @ V, tol)
    assert_close(A.T @ U.to(dtype), A64.T @ U, tol)
    assert_close(A.rmatvec(U[:, 0].to(dtype)), A64.T @ U[:, 0], tol)
    assert_close(A.rmatmat(U.to(dtype)), A64.T @ U, tol)
    C = 2.0 * A - B / 4
    assert C.shape == shape
    assert_close(C.to_dense(), 2 * A64 - B64 / 4, tol)
    assert_close(C.T.to_dense(), (2 * A64 - B64 / 4).T, tol)
    assert_close(A.T.to_dense(chunk_size=2), A64.T, tol)
    assert (A @ torch.ones(n, 0, dtype=dtype)).shape == (m, 0)
    before = A.T.matvecs
    A.T @ U.to(dtype)
    assert A.matvecs == 3 and A.T.matvecs == before + 2  # each object counts its own products


def test_square_constructor_unchanged_and_symmetric_is_self_adjoint():
    op = IdentityOperator(3, torch.float64, "cpu")
    assert op.shape == (3, 3) and op.is_square and op.T is op and op.adjoint() is op
    S = DenseOperator(torch.tensor([[2.0, 1.0], [1.0, 3.0]]))
    assert S.symmetric and S.T is S
    assert (S.damped(1.0).T @ torch.tensor([1.0, 0.0])).tolist() == [3.0, 1.0]


def test_rectangular_shape_errors():
    A = DenseOperator(torch.randn(5, 3))
    with pytest.raises(ValueError, match="cannot add"):
        A + DenseOperator(torch.randn(3, 5))
    with pytest.raises(ValueError, match="square"):
        A.damped(0.1)
    with pytest.raises(ValueError, match="cannot multiply"):
        A @ torch.ones(5)
    with pytest.raises(ValueError, match="cannot multiply"):
        A.T @ torch.ones(3)
    with pytest.raises(ValueError, match="cannot be symmetric"):
        DenseOperator(torch.randn(5, 3), symmetric=True)
    with pytest.raises(ValueError, match="square"):
        IdentityOperator((2, 3), torch.float32)
    with pytest.raises(ValueError, match=r"\(m, n\)"):
        LinearOperator((1, 2, 3), torch.float32, "cpu")


def test_operator_without_transposed_product_says_so():
    class Forward(LinearOperator):
        def _matvec(self, v):
            return v[:2] * 2

    op = Forward((2, 3), torch.float32, "cpu")
    assert not op.symmetric
    assert (op @ torch.ones(3)).tolist() == [2.0, 2.0]
    with pytest.raises(NotImplementedError, match="transposed product"):
        op.T @ torch.ones(2)


def test_callable_operator_with_rmatvec():
    M = torch.randn(4, 2, dtype=torch.float64)
    op = CallableOperator(lambda v: M @ v, (4, 2), torch.float64, rmatvec=lambda u: M.T @ u)
    assert not op.symmetric
    assert_close(op.to_dense(), M, PRODUCT_TOL[torch.float64])
    assert_close(op.T.to_dense(), M.T, PRODUCT_TOL[torch.float64])
    sq = CallableOperator(lambda v: 2 * v, 3, torch.float64)  # the old default: symmetric
    assert sq.symmetric and sq.T is sq
    with pytest.raises(ValueError, match="returned shape"):
        CallableOperator(lambda v: v, (4, 2), torch.float64) @ torch.ones(2, dtype=torch.float64)


def test_to_scipy_rectangular_round_trip():
    A64 = torch.randn(5, 3, dtype=torch.float64)
    S = DenseOperator(A64).to_scipy()
    assert S.shape == (5, 3)
    x, y = np.arange(3.0), np.arange(5.0)
    np.testing.assert_allclose(S.matvec(x), A64.numpy() @ x)
    np.testing.assert_allclose(S.rmatvec(y), A64.numpy().T @ y)
    np.testing.assert_allclose(S.matmat(np.eye(3)), A64.numpy())
    np.testing.assert_allclose(S.rmatmat(np.eye(5)), A64.numpy().T)
    back = aslinearoperator(S)  # a rectangular SciPy operator keeps its rmatvec
    assert back.shape == (5, 3)
    assert_close(back.T.to_dense(), A64.T, PRODUCT_TOL[torch.float64])


def test_complex_transpose_and_adjoint():
    A64 = torch.randn(3, 2, dtype=torch.complex128)
    A = DenseOperator(A64)
    u = torch.randn(3, dtype=torch.complex128)
    torch.testing.assert_close(A.H @ u, A64.mH @ u)
    torch.testing.assert_close(A.T @ u, A64.T @ u)
    torch.testing.assert_close(A.T.T @ torch.ones(2, dtype=torch.complex128), A64.sum(1))
    torch.testing.assert_close(A.T.to_dense(), A64.T)
