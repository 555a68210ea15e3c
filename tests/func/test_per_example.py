"""ModelFunction's per-example curvature products against torch.func dense references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dense_reference import ref_ggn, ref_hessian
from second import Task
from second.func.per_example import ModelFunction

# Tolerance: relative error of the product against the dense float64 reference.
PRODUCT_RTOL = 1e-11

LOSSES = {  # losses whose backward torch 2.13 cannot differentiate in forward mode
    "mse": nn.MSELoss(),
    "mse_sum": nn.MSELoss(reduction="sum"),
    "huber": nn.HuberLoss(delta=3.0),
    "smooth_l1": nn.SmoothL1Loss(beta=3.0),
    "cross_entropy": nn.CrossEntropyLoss(),
}


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_hessian_products_of_one_example(name, kind):
    loss_fn = LOSSES[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1]) if name == "cross_entropy" else torch.randn(1, 2, dtype=torch.float64)
    fn = ModelFunction(model, Task(loss_fn))
    V = torch.randn(fn.numel, 3, dtype=torch.float64)
    ref = (ref_hessian if kind == "hessian" else ref_ggn)(model, loss_fn, x, y)
    for cols in (V, V[:, 0]):
        got = fn.hessian_products((x, y), cols, kind)
        want = ref @ cols
        assert float((got - want).norm() / want.norm()) < PRODUCT_RTOL
