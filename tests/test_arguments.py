"""curvlinops' argument order (model, loss, params, data) gets an error naming the right order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from second import GGNOperator, HessianOperator
from second._arguments import check_argument_order


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    X, y = torch.randn(6, 3), torch.randn(6, 1)
    return model, nn.MSELoss(), list(model.parameters()), X, y


def _data_forms(X, y):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=3)
    return {"pair": (X, y), "list": [(X, y)], "loader": loader, "dicts": [{"x": X, "y": y}]}


@pytest.mark.parametrize("form", ["pair", "list", "loader", "dicts"])
def test_curvlinops_order_is_recognised(setup, form):
    model, loss, params, X, y = setup
    data = _data_forms(X, y)[form]
    with pytest.raises(TypeError, match=r"curvlinops' order \(model, loss, params, data\)"):
        check_argument_order("HessianOperator", params, data)
    with pytest.raises(TypeError, match=r"call GGNOperator\(model, loss_fn, data, params\)"):
        check_argument_order("GGNOperator", tuple(params), data)
    with pytest.raises(TypeError, match="parameters as `data`"):  # params left out entirely
        check_argument_order("GGNOperator", params, None)


@pytest.mark.parametrize("form", ["pair", "list", "loader", "dicts"])
def test_our_order_passes(setup, form):
    model, loss, params, X, y = setup
    data = _data_forms(X, y)[form]
    check_argument_order("HessianOperator", data, params)
    check_argument_order("HessianOperator", data, None)
    # a batch of inputs that require grad (e.g. for input gradients) is still data
    Xg = X.clone().requires_grad_(True)
    check_argument_order("HessianOperator", (Xg, y), params)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_operators_name_the_right_order(setup, cls):
    model, loss, params, X, y = setup
    with pytest.raises(TypeError, match=r"curvlinops' order"):
        cls(model, loss, params, [(X, y)])
