"""hvp, gvp, jvp, vjp against dense float64 ``torch.func`` references."""

from __future__ import annotations

import pytest
import torch

import second
from conftest import DTYPES, PRODUCT_TOL
from dense_reference import (
    CASE_IDS,
    CASES,
    DEVICES,
    MODELS,
    assert_close,
    cast,
    make_data,
    make_loss,
    make_model,
    ref_ggn,
    ref_hessian,
    ref_jacobian,
)
from second import gvp, hvp, jvp, parameters_to_vector, vector_to_parameters, vjp
from second._errors import SecondDeprecationWarning


def _problem(model_name, loss_name, reduction, dtype, device="cpu"):
    torch.manual_seed(1)
    model64 = make_model(model_name)
    X64, y64 = make_data(model_name, loss_name)
    loss_fn = make_loss(loss_name, reduction)
    model, X, y = cast(model64, X64, y64, dtype, device)
    params = tuple(model.parameters())
    out = model(X)
    loss = loss_fn(out, y)
    return model64, X64, y64, loss_fn, params, out, loss


def _vector(params, dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in params)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype=dtype, device=params[0].device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hvp_matches_torch_func_hessian(case, dtype, device):
    model64, X64, y64, loss_fn, params, _, loss = _problem(*case, dtype, device)
    H = ref_hessian(model64, loss_fn, X64, y64)
    v = _vector(params, dtype)
    assert v.device.type == device
    expected = H @ v.double().cpu()
    assert_close(hvp(loss, params, v), expected, PRODUCT_TOL[dtype])
    # parameter-shaped vector in, parameter-shaped result out
    out = hvp(loss, params, vector_to_parameters(v, params), flatten=False)
    assert isinstance(out, tuple) and [t.shape for t in out] == [p.shape for p in params]
    assert_close(parameters_to_vector(out), expected, PRODUCT_TOL[dtype])
    # a second product on the same loss reuses the memoized gradient graph
    w = _vector(params, dtype, seed=3)
    assert_close(hvp(loss, params, w), H @ w.double().cpu(), PRODUCT_TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gvp_matches_jacobian_sandwich(case, dtype, device):
    model64, X64, y64, loss_fn, params, out, loss = _problem(*case, dtype, device)
    G = ref_ggn(model64, loss_fn, X64, y64)
    v = _vector(params, dtype)
    expected = G @ v.double().cpu()
    assert_close(gvp(loss, out, params, v), expected, PRODUCT_TOL[dtype])
    res = gvp(loss, out, params, list(vector_to_parameters(v, params)), flatten=False)
    assert [t.shape for t in res] == [p.shape for p in params]
    assert_close(parameters_to_vector(res), expected, PRODUCT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model_name", MODELS)
def test_jvp_and_vjp_match_jacobian(model_name, dtype):
    model64, X64, _, _, params, out, _ = _problem(model_name, "mse", "mean", dtype)
    J = ref_jacobian(model64, X64)
    v = _vector(params, dtype)
    tol = PRODUCT_TOL[dtype]
    assert_close(jvp(out, params, v), J @ v.double(), tol)
    shaped = jvp(out, params, vector_to_parameters(v, params), flatten=False)
    assert shaped.shape == out.shape
    assert_close(shaped.reshape(-1), J @ v.double(), tol)
    u = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    assert_close(vjp(out, params, u), J.T @ u.double().reshape(-1), tol)
    parts = vjp(out, params, u, flatten=False)
    assert [t.shape for t in parts] == [p.shape for p in params]
    assert_close(parameters_to_vector(parts), J.T @ u.double().reshape(-1), tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_jvp_of_gradient_is_hvp(dtype):
    model64, X64, y64, loss_fn, params, _, loss = _problem("mlp_tanh", "ce", "mean", dtype)
    g = torch.autograd.grad(loss, params, create_graph=True)
    v = _vector(params, dtype)
    H = ref_hessian(model64, loss_fn, X64, y64)
    assert_close(jvp(g, params, v), H @ v.double(), PRODUCT_TOL[dtype])


def test_jvp_several_outputs_unflattened():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    a, b = x**2, x.sum() * 3
    ja, jb = jvp([a, b], [x], torch.tensor([1.0, -1.0], dtype=torch.float64), flatten=False)
    torch.testing.assert_close(ja, torch.tensor([2.0, -4.0], dtype=torch.float64))
    torch.testing.assert_close(jb, torch.tensor(0.0, dtype=torch.float64))


def test_jvp_deprecated_keyword_warns(monkeypatch):
    import second.func.products as products

    seen, real = [], products.grad_of_live  # the retain_graph of jvp's last backward pass

    def spy(*args, retain_graph, **kwargs):
        seen.append(retain_graph)
        return real(*args, retain_graph=retain_graph, **kwargs)

    monkeypatch.setattr(products, "grad_of_live", spy)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    match = (
        r"jvp\(retrain_graph=\.\.\.\) is deprecated and stops working in 0\.3: use retain_graph="
    )
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        out = jvp(x**2, [x], torch.ones(2), retrain_graph=False)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    torch.testing.assert_close(out, torch.tensor([2.0, 4.0]))
    assert seen == [False]  # the value is honoured
    with pytest.raises(TypeError, match="unexpected"):
        jvp(x**2, [x], torch.ones(2), bogus=1)
    # both spellings are refused, as for every renamed keyword (the old one won silently)
    with pytest.warns(SecondDeprecationWarning), pytest.raises(ValueError, match="pass retain"):
        jvp(x**2, [x], torch.ones(2), retain_graph=False, retrain_graph=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hvp_without_retain_graph_and_after_cache_clear(dtype):
    model64, X64, y64, loss_fn, params, _, loss = _problem("cnn", "bce", "sum", dtype)
    H = ref_hessian(model64, loss_fn, X64, y64)
    v = _vector(params, dtype)
    assert_close(hvp(loss, params, v), H @ v.double(), PRODUCT_TOL[dtype])
    second.func.clear_cache()
    assert_close(hvp(loss, params, v), H @ v.double(), PRODUCT_TOL[dtype])
    # a fresh forward pass, products that free the graph
    model = cast(model64, X64, y64, dtype)[0]
    Xd, yd = cast(model64, X64, y64, dtype)[1:]
    loss2 = loss_fn(model(Xd), yd)
    p2 = tuple(model.parameters())
    assert_close(hvp(loss2, p2, v, retain_graph=False), H @ v.double(), PRODUCT_TOL[dtype])


def test_hvp_subset_of_parameters():
    torch.manual_seed(1)
    model64 = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", "mse")
    loss_fn = make_loss("mse", "mean")
    H = ref_hessian(model64, loss_fn, X, y)
    params = list(model64.parameters())
    # the block of the last layer (its weight and bias are the last 18 entries)
    last = params[2:]
    n_last = sum(p.numel() for p in last)
    v = torch.randn(n_last, dtype=torch.float64)
    loss = loss_fn(model64(X), y)
    assert_close(hvp(loss, last, v), H[-n_last:, -n_last:] @ v, PRODUCT_TOL[torch.float64])


def test_hvp_of_loss_linear_in_a_parameter_is_zero_there():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = (w**2).sum() + 3 * b  # d2L/db2 = 0, and d2L/dw2 = 2 I
    out = hvp(loss, [w, b], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64))
    linear = (3 * w).sum()
    torch.testing.assert_close(
        hvp(linear, [w], torch.ones(2, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64)
    )
