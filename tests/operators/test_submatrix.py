"""SubmatrixOperator against dense indexing ``A[rows][:, cols]``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DTYPES, PRODUCT_TOL
from dense_reference import assert_close, make_data, make_model, ref_hessian
from second import (
    DenseOperator,
    HessianOperator,
    JacobianOperator,
    SubmatrixOperator,
)

INDEX_CASES = {  # (rows, cols) of a 6 x 5 matrix
    "block": ([0, 1, 2], [3, 4]),
    "scattered": ([5, 0, 3], [4, 1, 2, 0]),
    "repeated": ([1, 1, 4], [2, 2, 0]),  # a repeated column adds up, as dense indexing does
    "one": ([2], [3]),
    "tensor": (torch.tensor([4, 2]), torch.tensor([0, 1, 2, 3, 4])),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", INDEX_CASES)
def test_products_match_dense_indexing(case, dtype):
    rows, cols = INDEX_CASES[case]
    A = torch.randn(6, 5, dtype=torch.float64)
    ref = A[torch.as_tensor(rows)][:, torch.as_tensor(cols)]
    S = SubmatrixOperator(DenseOperator(A.to(dtype)), rows, cols)
    tol = PRODUCT_TOL[dtype]
    assert S.shape == tuple(ref.shape) and not S.symmetric
    v, V = torch.randn(ref.shape[1], dtype=torch.float64), torch.randn(ref.shape[1], 3).double()
    u, U = torch.randn(ref.shape[0], dtype=torch.float64), torch.randn(ref.shape[0], 2).double()
    assert_close(S @ v.to(dtype), ref @ v, tol, "A_IJ v")
    assert_close(S @ V.to(dtype), ref @ V, tol, "A_IJ V")
    assert_close(S.T @ u.to(dtype), ref.T @ u, tol, "A_IJ^T u")
    assert_close(S.T @ U.to(dtype), ref.T @ U, tol, "A_IJ^T U")
    assert_close(S.to_dense(), ref, tol, "dense")


def test_principal_submatrix_of_a_symmetric_operator_is_symmetric():
    B = torch.randn(6, 6, dtype=torch.float64)
    A = DenseOperator(B @ B.T)
    assert A.symmetric
    idx = [4, 0, 2]
    S = SubmatrixOperator(A, idx, idx)
    assert S.symmetric and S.T is S
    assert_close(S.to_dense(), (B @ B.T)[idx][:, idx], PRODUCT_TOL[torch.float64])
    assert not SubmatrixOperator(A, idx, [4, 0, 1]).symmetric
    assert not SubmatrixOperator(A, idx, [0, 4, 2]).symmetric  # same set, other order


def test_layer_block_of_the_hessian():
    torch.manual_seed(1)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", "mse")
    H = HessianOperator(model, nn.MSELoss(), (X, y))
    H_ref = ref_hessian(model, nn.MSELoss(), X, y)
    first = sum(p.numel() for p in model[0].parameters())  # the first layer's block
    idx = list(range(first))
    block = SubmatrixOperator(H, idx, idx)
    assert block.symmetric
    assert_close(block.to_dense(), H_ref[:first, :first], PRODUCT_TOL[torch.float64])


def test_submatrix_of_a_rectangular_operator():
    torch.manual_seed(1)
    model = make_model("mlp_tanh")
    X, _ = make_data("mlp_tanh", "mse")
    J = JacobianOperator(model, X)
    Jd = J.to_dense()
    rows, cols = [0, 5, 7], [1, 30, 2, 40]
    S = SubmatrixOperator(J, rows, cols)
    assert_close(S.to_dense(), Jd[rows][:, cols], PRODUCT_TOL[torch.float64])
    assert_close(S.T.to_dense(), Jd[rows][:, cols].T, PRODUCT_TOL[torch.float64])


def test_empty_selection():
    S = SubmatrixOperator(torch.eye(3), [], [0, 1])
    assert S.shape == (0, 2)
    assert (S @ torch.ones(2)).shape == (0,)
    assert (S.T @ torch.ones(0)).tolist() == [0.0, 0.0]


def test_bad_indices():
    A = DenseOperator(torch.eye(4))
    with pytest.raises(ValueError, match="out of range"):
        SubmatrixOperator(A, [0, 4], [0])
    with pytest.raises(ValueError, match="out of range"):
        SubmatrixOperator(A, [0], [-1])
    with pytest.raises(TypeError, match="integers"):
        SubmatrixOperator(A, [0.5], [0])
    with pytest.raises(ValueError, match="one-dimensional"):
        SubmatrixOperator(A, torch.zeros(2, 2, dtype=torch.long), [0])
