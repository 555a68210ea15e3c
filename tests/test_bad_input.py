"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import second.optim
from second import (
    FisherOperator,
    GGNOperator,
    HessianOperator,
    NonFiniteError,
    exact_ggn,
    exact_hessian,
    gvp,
    hvp,
    jvp,
    parameters_to_vector,
    vector_to_parameters,
    vjp,
)

OPERATORS = [HessianOperator, GGNOperator, FisherOperator]


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    X, y = torch.randn(6, 3), torch.randn(6, 2)
    out = model(X)
    loss = nn.MSELoss()(out, y)
    return model, X, y, out, loss, tuple(model.parameters())


N_PARAMS = 3 * 4 + 4 + 4 * 2 + 2  # 26


# ----------------------------------------------------------------------------- vectors
@pytest.mark.parametrize(
    "vector, error, match",
    [
        (torch.ones(N_PARAMS + 1), ValueError, "27 entries"),
        (torch.ones(N_PARAMS - 1), ValueError, "25 entries"),
        (torch.ones(2, 13), ValueError, "1-D"),
        (torch.ones(N_PARAMS, dtype=torch.float64), TypeError, "dtype"),
        (torch.ones(N_PARAMS, device="meta"), ValueError, "meta"),
        ([torch.ones(4, 3)], ValueError, "1 tensors"),
    ],
    ids=["too long", "too short", "2-D", "dtype", "device", "too few tensors"],
)
def test_products_reject_a_bad_vector(vector, error, match):
    _, _, _, out, loss, params = _setup()
    for f in (
        lambda: hvp(loss, params, vector),
        lambda: gvp(loss, out, params, vector),
        lambda: jvp(out, params, vector),
    ):
        with pytest.raises(error, match=match):
            f()


def test_parameter_shaped_vector_with_wrong_entry():
    _, _, _, out, loss, params = _setup()
    vs = [torch.ones_like(p) for p in params]
    vs[1] = torch.ones(5)
    with pytest.raises(ValueError, match="entry 1 has shape"):
        hvp(loss, params, vs)
    vs[1] = torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeError, match="entry 1 has dtype"):
        hvp(loss, params, vs)


@pytest.mark.parametrize("cls", OPERATORS)
@pytest.mark.parametrize(
    "vector, error, match",
    [
        (torch.ones(N_PARAMS + 1), ValueError, "cannot multiply"),
        (torch.ones(N_PARAMS, 2, 2), ValueError, "cannot multiply"),
        (torch.ones(N_PARAMS, dtype=torch.float64), TypeError, "dtype"),
        (torch.ones(N_PARAMS, device="meta"), ValueError, "meta"),
    ],
    ids=["size", "3-D", "dtype", "device"],
)
def test_operators_reject_a_bad_vector(cls, vector, error, match):
    model, X, y, *_ = _setup()
    op = cls(model, nn.MSELoss(), (X, y))
    with pytest.raises(error, match=match):
        op @ vector
    assert op.__matmul__([1.0] * N_PARAMS) is NotImplemented


def test_vjp_and_vector_helpers_reject_bad_shapes():
    _, _, _, out, _, params = _setup()
    with pytest.raises(ValueError, match="shape"):
        vjp(out, params, torch.ones(3))
    with pytest.raises(ValueError, match="1-D"):
        vector_to_parameters(torch.ones(2, 13), params)
    with pytest.raises(ValueError, match="entries"):
        vector_to_parameters(torch.ones(5), params)
    with pytest.raises(ValueError, match="empty"):
        parameters_to_vector([])
    with pytest.raises(ValueError, match="None"):
        parameters_to_vector([torch.ones(2), None])


# ----------------------------------------------------------------------------- losses
def test_non_scalar_loss():
    _, X, y, out, _, params = _setup()
    per_entry = nn.MSELoss(reduction="none")(out, y)
    v = torch.ones(N_PARAMS)
    for f in (
        lambda: hvp(per_entry, params, v),
        lambda: gvp(per_entry, out, params, v),
        lambda: exact_hessian(per_entry, params),
        lambda: exact_ggn(per_entry, out, params),
    ):
        with pytest.raises(ValueError, match=r"scalar.*\(6, 2\)"):
            f()


@pytest.mark.parametrize("cls", OPERATORS)
def test_operator_with_non_scalar_loss(cls):
    model, X, y, *_ = _setup()
    with pytest.raises(ValueError, match="reduction 'mean' or 'sum'.*'none'"):
        cls(model, nn.MSELoss(reduction="none"), (X, y))
    # a plain function that forgets to reduce
    op = cls(model, lambda o, t: (o - t) ** 2, (X, y))
    with pytest.raises(ValueError, match="scalar"):
        op @ torch.ones(N_PARAMS)


def test_loss_without_graph():
    _, _, _, _, loss, params = _setup()
    with pytest.raises(ValueError, match="does not require grad"):
        hvp(loss.detach(), params, torch.ones(N_PARAMS))
    with pytest.raises(TypeError, match="torch.Tensor"):
        hvp(1.0, params, torch.ones(N_PARAMS))


def test_gvp_logit_without_graph():
    _, _, _, out, loss, params = _setup()
    with pytest.raises(ValueError, match="logit"):
        gvp(loss, out.detach(), params, torch.ones(N_PARAMS))


# ----------------------------------------------------------------------------- parameters
def test_parameters_that_do_not_require_grad():
    model, X, y, _, loss, params = _setup()
    frozen = torch.zeros(3)
    with pytest.raises(ValueError, match=r"parameter 4 \(shape \(3,\)\) does not require grad"):
        hvp(loss, [*params, frozen], torch.ones(N_PARAMS + 3))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require grad"):
        HessianOperator(model, nn.MSELoss(), (X, y))


def test_parameters_not_in_the_graph():
    model, X, y, out, loss, params = _setup()
    stray = torch.zeros(5, requires_grad=True)
    with pytest.raises(ValueError, match=r"parameter 4 \(shape \(5,\)\) is not in the graph"):
        hvp(loss, [*params, stray], torch.ones(N_PARAMS + 5))
    with pytest.raises(ValueError, match="not in the graph"):
        exact_hessian(loss, [*params, stray])
    with pytest.raises(ValueError, match="not in the graph"):
        vjp(out, [stray], torch.ones_like(out))
    op = HessianOperator(model, nn.MSELoss(), (X, y), params=[*params, stray])
    with pytest.raises(ValueError, match="not in the graph"):
        op @ torch.ones(N_PARAMS + 5)


def test_bad_parameter_containers():
    _, _, _, _, loss, params = _setup()
    with pytest.raises(ValueError, match="no parameters"):
        hvp(loss, [], torch.ones(1))
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        hvp(loss, [params[0], "bias"], torch.ones(N_PARAMS))
    w64 = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(TypeError, match="mixed dtypes"):
        hvp(loss, [*params, w64], torch.ones(N_PARAMS + 2))


# ----------------------------------------------------------------------------- non-finite
def test_nan_loss_is_reported():
    model, X, y, out, _, params = _setup()
    nan_loss = nn.MSELoss()(out, torch.full_like(y, float("nan")))
    with pytest.raises(NonFiniteError, match="loss is not finite"):
        hvp(nan_loss, params, torch.ones(N_PARAMS))
    Xbad = X.clone()
    Xbad[2, 1] = float("inf")
    for cls in OPERATORS:
        op = cls(model, nn.MSELoss(), (Xbad, y))
        with pytest.raises(NonFiniteError):
            op @ torch.ones(N_PARAMS)
    with pytest.raises(NonFiniteError):
        GGNOperator(model, nn.MSELoss(), (Xbad, y)).loss_and_gradient()


def test_non_finite_product_is_reported():
    w = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = w.abs().pow(1.5).sum()  # finite loss and gradient, infinite curvature at w = 0
    with pytest.raises(NonFiniteError, match="Hessian-vector product has"):
        hvp(loss, [w], torch.tensor([1.0, 0.0]))
    with pytest.raises(NonFiniteError, match="Hessian"):
        exact_hessian(loss, [w])
    _, X, y, out, loss, params = _setup()
    v = torch.ones(N_PARAMS)
    v[0] = float("nan")
    with pytest.raises(NonFiniteError, match="non-finite"):
        hvp(loss, params, v)
    with pytest.raises(NonFiniteError, match="non-finite"):
        gvp(loss, out, params, v)


def test_operator_nan_vector_is_reported():
    model, X, y, *_ = _setup()
    op = GGNOperator(model, nn.MSELoss(), (X, y))
    v = torch.ones(N_PARAMS)
    v[3] = float("inf")
    with pytest.raises(NonFiniteError, match="GGNOperator product"):
        op @ v


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("cls", OPERATORS)
def test_empty_data(cls):
    model, X, y, *_ = _setup()
    v = torch.ones(N_PARAMS)
    empty_loader = DataLoader(TensorDataset(X[:0], y[:0]), batch_size=2)
    for data in ([], empty_loader, [(X[:0], y[:0])]):
        op = cls(model, nn.MSELoss(), data)
        with pytest.raises(ValueError, match="the data is empty"):
            op @ v
    with pytest.raises(TypeError, match="one-shot iterator"):  # read once, empty after
        cls(model, nn.MSELoss(), iter([]))
    with pytest.raises(ValueError, match="the data is empty"):
        cls(model, nn.MSELoss(), []).loss_and_gradient()


@pytest.mark.parametrize(
    "make_data, error, match",
    [
        (lambda X, y: X, TypeError, "each batch must be an \\(X, y\\) pair"),
        (lambda X, y: [(X, y, y)], TypeError, "each batch must be an \\(X, y\\) pair"),
        (lambda X, y: [{"x": X, "y": y}], TypeError, "each batch must be an \\(X, y\\) pair"),
        (lambda X, y: 3, TypeError, "data must be an \\(X, y\\) batch"),
        (lambda X, y: (X, y[:4]), ValueError, "6 examples but targets have 4"),
        (lambda X, y: [(X, y), (X[:2], y)], ValueError, "2 examples but targets have 6"),
    ],
    ids=["bare tensor", "triple", "dict", "int", "size mismatch", "size mismatch in a batch"],
)
def test_wrong_batch_structure(make_data, error, match):
    model, X, y, *_ = _setup()
    op = HessianOperator(model, nn.MSELoss(), make_data(X, y))
    with pytest.raises(error, match=match):
        op @ torch.ones(N_PARAMS)


def test_distributed_requested_without_a_process_group():
    model, X, y, *_ = _setup()
    op = HessianOperator(model, nn.MSELoss(), (X, y), distributed=True)
    with pytest.raises(RuntimeError, match="no torch.distributed process group"):
        op @ torch.ones(N_PARAMS)


def test_mc_fisher_needs_a_likelihood():
    model, X, y, *_ = _setup()
    op = FisherOperator(model, lambda o, t: ((o - t) ** 2).mean(), (X, y), fisher="mc")
    with pytest.raises(NotImplementedError, match="likelihood"):
        op @ torch.ones(N_PARAMS)
    # a weighted loss is a likelihood with weights the operators see (tests/test_losses.py);
    # the optimizers, whose statistics do not see the targets, refuse it
    weighted = nn.BCEWithLogitsLoss(pos_weight=torch.ones(2))
    with pytest.raises(NotImplementedError, match="weighted"):
        second.optim.KFAC(model, weighted)
