"""Jacobian and transposed-Jacobian operators against a dense float64 ``torch.func`` Jacobian."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import DTYPES, PRODUCT_TOL
from dense_reference import (
    MODELS,
    REDUCTIONS,
    assert_close,
    cast,
    make_data,
    make_model,
    ref_jacobian,
)
from second import (
    GGNOperator,
    JacobianOperator,
    NonDeterministicDataError,
    TransposedJacobianOperator,
)

N_DATA = 7
SPLIT = [2, 4, 1]  # unequal batch sizes
LAYOUTS = ["inputs", "batch", "batches"]


def _problem(model_name: str, dtype: torch.dtype):
    torch.manual_seed(1)
    model64 = make_model(model_name)
    X64, y64 = make_data(model_name, "mse", N_DATA)
    model, X, y = cast(model64, X64, y64, dtype)
    return model64, X64, model, X, y


def _data(layout: str, X, y):
    if layout == "inputs":
        return X
    if layout == "batch":
        return (X, y)
    out, start = [], 0
    for s in SPLIT:
        out.append((X[start : start + s], y[start : start + s]))
        start += s
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_name", MODELS)
def test_products_and_dense_match_torch_func(model_name, dtype, layout):
    model64, X64, model, X, y = _problem(model_name, dtype)
    J_ref = ref_jacobian(model64, X64)  # [N C, P], float64
    tol = PRODUCT_TOL[dtype]
    J = JacobianOperator(model, _data(layout, X, y))
    M, P = J_ref.shape
    assert J.shape == (M, P) and J.T.shape == (P, M)
    assert J.num_outputs == M and J.num_data == N_DATA and not J.symmetric

    v, V = torch.randn(P, dtype=torch.float64), torch.randn(P, 3, dtype=torch.float64)
    u, U = torch.randn(M, dtype=torch.float64), torch.randn(M, 4, dtype=torch.float64)
    assert_close(J @ v.to(dtype), J_ref @ v, tol, "J v")
    assert_close(J @ V.to(dtype), J_ref @ V, tol, "J V")
    assert_close(J.T @ u.to(dtype), J_ref.T @ u, tol, "J^T u")
    assert_close(J.T @ U.to(dtype), J_ref.T @ U, tol, "J^T U")
    assert_close(J.rmatvec(u.to(dtype)), J_ref.T @ u, tol, "rmatvec")
    assert_close(J.to_dense(chunk_size=5), J_ref, tol, "J dense")
    assert_close(J.T.to_dense(chunk_size=5), J_ref.T, tol, "J^T dense")

    JT = TransposedJacobianOperator(model, _data(layout, X, y))
    assert isinstance(JT.T, JacobianOperator) and JT.T.T is JT and J.T.T is J
    assert_close(JT @ U.to(dtype), J_ref.T @ U, tol, "TransposedJacobianOperator")
    assert_close(JT.T @ V.to(dtype), J_ref @ V, tol, "TransposedJacobianOperator.T")


@pytest.mark.parametrize("layout", ["batch", "batches"])
def test_loop_columns_and_kept_graphs_give_the_same_products(layout):
    model64, X64, model, X, y = _problem("mlp_tanh", torch.float64)
    J_ref = ref_jacobian(model64, X64)
    tol = PRODUCT_TOL[torch.float64]
    for kw in ({"columns": "loop"}, {"cache_graphs": True}):
        J = JacobianOperator(model, _data(layout, X, y), **kw)
        assert_close(J.to_dense(), J_ref, tol, str(kw))
        assert_close(J.T.to_dense(), J_ref.T, tol, str(kw))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("layout", ["batch", "batches"])
def test_ggn_is_jt_hloss_j_on_mse(layout, reduction):
    """For MSE, ``d^2 L / d f^2`` is ``2 I / (N C)`` (mean) or ``2 I`` (sum)."""
    model64, X64, model, X, y = _problem("mlp_sigmoid", torch.float64)
    data = _data(layout, X, y)
    J = JacobianOperator(model, data)
    G = GGNOperator(model, nn.MSELoss(reduction=reduction), data)
    h = 2.0 / J.shape[0] if reduction == "mean" else 2.0
    tol = PRODUCT_TOL[torch.float64]
    Jd = J.to_dense()
    assert_close(G.to_dense(), h * Jd.T @ Jd, tol, "dense GGN")
    v = torch.randn(J.shape[1], dtype=torch.float64)
    assert_close(G @ v, J.T @ (h * (J @ v)), tol, "matrix-free GGN")


def test_data_loader_and_targets_ignored():
    model64, X64, model, X, y = _problem("mlp_tanh", torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=3, shuffle=False)
    J = JacobianOperator(model, loader)
    assert [s[0] for s in J.output_shapes] == [3, 3, 1]
    assert_close(J.to_dense(), ref_jacobian(model64, X64), PRODUCT_TOL[torch.float64])


def test_shuffled_loader_is_refused():
    _, _, model, X, y = _problem("mlp_tanh", torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=3, shuffle=True)
    J = JacobianOperator(model, loader)
    with pytest.raises(NonDeterministicDataError):
        for _ in range(5):  # the shuffle differs from the first pass within a few products
            J @ torch.ones(J.shape[1], dtype=torch.float64)


def test_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(NonDeterministicDataError, match="eval"):
        JacobianOperator(model, torch.randn(5, 3))
    JacobianOperator(model.eval(), torch.randn(5, 3))


def test_subset_of_parameters_and_refresh():
    model64, X64, model, X, y = _problem("mlp_tanh", torch.float64)
    last = list(model.parameters())[-2:]  # the output layer's weight and bias
    J = JacobianOperator(model, (X, y), params=last)
    P = sum(p.numel() for p in last)
    assert J.shape == (N_DATA * 3, P)
    J_ref = ref_jacobian(model64, X64)[:, -P:]
    assert_close(J.to_dense(), J_ref, PRODUCT_TOL[torch.float64])
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    # an in-place update bumps the parameters' versions: the kept graph is rebuilt
    model64.load_state_dict(model.state_dict())
    assert_close(J.to_dense(), ref_jacobian(model64, X64)[:, -P:], PRODUCT_TOL[torch.float64])
    for p in model.parameters():
        p.data.mul_(0.5)  # invisible to the version counters
    J.refresh()
    model64.load_state_dict(model.state_dict())
    assert_close(J.to_dense(), ref_jacobian(model64, X64)[:, -P:], PRODUCT_TOL[torch.float64])


def test_to_scipy_is_rectangular_with_rmatvec():
    np = pytest.importorskip("numpy")
    model64, X64, model, X, y = _problem("mlp_tanh", torch.float64)
    J_ref = ref_jacobian(model64, X64).numpy()
    S = JacobianOperator(model, X).to_scipy()
    assert S.shape == J_ref.shape
    u = np.random.default_rng(0).standard_normal(J_ref.shape[0])
    np.testing.assert_allclose(S.rmatvec(u), J_ref.T @ u, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(S.matmat(np.eye(J_ref.shape[1])), J_ref, rtol=1e-10, atol=1e-12)


def test_bad_input():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="columns"):
        JacobianOperator(model, torch.randn(4, 3), columns="fast")
    with pytest.raises(ValueError, match="no parameters"):
        JacobianOperator(nn.ReLU(), torch.randn(4, 3))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match="one tensor"):
        JacobianOperator(Pair(), torch.randn(4, 3))
    J = JacobianOperator(model, torch.randn(5, 3))  # 10 x 8
    with pytest.raises(ValueError, match="cannot multiply"):
        J @ torch.ones(10)  # a vector of the output space
    with pytest.raises(ValueError, match="square"):
        J.damped(1.0)
