"""The operators' speed paths (kept per-batch graphs, column loop or vmap) vs dense references."""

from __future__ import annotations

import pytest
import torch

from conftest import PRODUCT_TOL
from dense_reference import (
    assert_close,
    make_data,
    make_loss,
    make_model,
    ref_empirical_fisher,
    ref_ggn,
    ref_hessian,
)
from second import FisherOperator, GGNOperator, HessianOperator

TOL = PRODUCT_TOL[torch.float64]
KINDS = {
    "hessian": (HessianOperator, {}, lambda m, lf, X, y, red: ref_hessian(m, lf, X, y)),
    "ggn": (GGNOperator, {}, lambda m, lf, X, y, red: ref_ggn(m, lf, X, y)),
    "ef": (
        FisherOperator,
        {"fisher": "empirical"},
        lambda m, lf, X, y, red: ref_empirical_fisher(m, lf, X, y, red),
    ),
}
PROBLEMS = [("mlp_tanh", "mse"), ("mlp_sigmoid", "ce"), ("cnn", "bce")]


def _problem(model_name, loss_name, reduction):
    model = make_model(model_name)
    X, y = make_data(model_name, loss_name)
    return model, make_loss(loss_name, reduction), X, y


def _batches(X, y, size=2):
    return list(zip(X.split(size), y.split(size), strict=True))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cached_graphs_match_dense(kind, problem, reduction):
    model, loss_fn, X, y = _problem(*problem, reduction)
    cls, kw, ref = KINDS[kind]
    A = ref(model, loss_fn, X, y, reduction)
    op = cls(model, loss_fn, _batches(X, y), cache_graphs=True, **kw)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64)
    for _ in range(2):  # the first product builds the graphs, the second reuses them
        assert_close(op @ v, A @ v, TOL, f"{kind} {problem} {reduction} cached")
    assert op._states is not None and len(op._states) == 3
    assert_close(op @ V, A @ V, TOL, f"{kind} {problem} {reduction} cached matmat")
    assert op.num_data == X.shape[0]


@pytest.mark.parametrize("columns", ["loop", "vmap", "auto"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("several", [False, True])
def test_column_strategies_match_dense(columns, kind, several):
    model, loss_fn, X, y = _problem("mlp_sigmoid", "ce", "mean")
    cls, kw, ref = KINDS[kind]
    A = ref(model, loss_fn, X, y, "mean")
    data = _batches(X, y, 4) if several else (X, y)
    op = cls(model, loss_fn, data, columns=columns, **kw)
    V = torch.randn(op.shape[0], 5, dtype=torch.float64)
    assert_close(op @ V, A @ V, TOL, f"{kind} columns={columns}")
    assert_close(op @ V[:, :1], A @ V[:, :1], TOL, f"{kind} one column")
    assert_close(op.to_dense(), A, TOL, f"{kind} to_dense columns={columns}")


def test_refresh_drops_cached_graphs():
    model, loss_fn, X, y = _problem("mlp_tanh", "mse", "mean")
    op = HessianOperator(model, loss_fn, _batches(X, y), cache_graphs=True)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    op.refresh()
    assert op._states is None
    assert_close(op @ v, ref_hessian(model, loss_fn, X, y) @ v, TOL, "after refresh")


def test_bad_columns_option():
    model, loss_fn, X, y = _problem("mlp_tanh", "mse", "mean")
    with pytest.raises(ValueError, match="columns"):
        HessianOperator(model, loss_fn, (X, y), columns="threads")


@pytest.mark.parametrize("retain_graph", [True, False])
def test_functional_hvp_flat_and_list_vectors_match_dense(retain_graph):
    from second import hvp

    model, loss_fn, X, y = _problem("mlp_sigmoid", "ce", "mean")
    A = ref_hessian(model, loss_fn, X, y)
    params = list(model.parameters())
    v = torch.randn(A.shape[0], dtype=torch.float64)
    vs = [t.view_as(p) for t, p in zip(v.split([p.numel() for p in params]), params, strict=True)]
    for vec in (v, vs):
        loss = loss_fn(model(X), y)
        for _ in range(2 if retain_graph else 1):  # the second call reuses the kept graph
            assert_close(hvp(loss, params, vec, retain_graph=retain_graph), A @ v, TOL, "hvp")


def test_functional_hvp_flat_vector_errors():
    from second import hvp

    model, loss_fn, X, y = _problem("mlp_tanh", "mse", "mean")
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    loss = loss_fn(model(X), y)
    with pytest.raises(ValueError, match="entries"):
        hvp(loss, params, torch.zeros(n + 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        hvp(loss, params, torch.zeros(n, dtype=torch.float32))


@pytest.mark.parametrize("columns", ["loop", "vmap"])
def test_hessian_of_a_loss_linear_in_the_parameters_is_zero(columns):
    model = make_model("linear")
    X, _ = make_data("linear", "mse")
    y = torch.zeros(X.shape[0])
    op = HessianOperator(model, lambda out, t: out.sum() + 0 * t.sum(), (X, y), columns=columns)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.equal(op @ v, torch.zeros_like(v))
    assert torch.equal(
        op @ v.outer(torch.ones(3, dtype=v.dtype)), torch.zeros(op.shape[0], 3, dtype=v.dtype)
    )


def test_auto_columns_picks_vmap_for_small_batches_and_loop_for_large_ones_on_cpu():
    model, loss_fn, X, y = _problem("mlp_tanh", "mse", "mean")
    op = HessianOperator(model, loss_fn, (X, y))
    assert op._mode(False, X.shape[0]) == "vec"
    assert op._mode(True, X.shape[0]) == "vmap"
    assert op._mode(True, 10**9) == "loop"  # CPU, a batch big enough that a column costs ms
    assert HessianOperator(model, loss_fn, (X, y), columns="loop")._mode(True, 1) == "loop"


def test_fingerprint_reuse_still_sees_changed_batches():
    from second import NonDeterministicDataError

    model, loss_fn, X, y = _problem("mlp_tanh", "mse", "mean")
    batches = _batches(X.clone(), y)
    op = HessianOperator(model, loss_fn, batches)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    first = op @ v
    assert_close(op @ v, first, TOL, "same tensors, fingerprints reused")
    saved = batches[1][0].clone()
    batches[1][0].add_(1.0)  # in place: the version counter moves
    with pytest.raises(NonDeterministicDataError, match="batch 1"):
        op @ v
    batches[1] = (saved, batches[1][1])  # new tensor, the same values (bit for bit): accepted
    assert_close(op @ v, first, TOL, "new tensor with the first values")
    batches[2] = (torch.randn_like(batches[2][0]), batches[2][1])
    with pytest.raises(NonDeterministicDataError, match="batch 2"):
        op @ v
