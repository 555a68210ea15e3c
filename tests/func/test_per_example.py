"""ModelFunction's per-example curvature products against torch.func dense references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dense_reference import ref_ggn, ref_hessian
from second import Task
from second._errors import SecondDeprecationWarning
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
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_hessian_products_of_one_example(name, curvature):
    loss_fn = LOSSES[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1]) if name == "cross_entropy" else torch.randn(1, 2, dtype=torch.float64)
    fn = ModelFunction(model, Task(loss_fn))
    V = torch.randn(fn.numel, 3, dtype=torch.float64)
    ref = (ref_hessian if curvature == "hessian" else ref_ggn)(model, loss_fn, x, y)
    for cols in (V, V[:, 0]):
        got = fn.hessian_products((x, y), cols, curvature=curvature)
        want = ref @ cols
        assert float((got - want).norm() / want.norm()) < PRODUCT_RTOL


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_kind_is_the_deprecated_spelling_of_curvature(curvature):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    fn = ModelFunction(model, Task(nn.CrossEntropyLoss()))
    V = torch.randn(fn.numel, 3, dtype=torch.float64)
    new = fn.hessian_products((x, y), V, curvature=curvature)
    with pytest.warns(SecondDeprecationWarning, match=r"\(kind=.*use curvature="):
        old = fn.hessian_products((x, y), V, kind=curvature)
    assert torch.equal(old, new)
    assert torch.equal(fn.hessian_products((x, y), V, curvature), new)  # positional as before
    if curvature == "fisher":  # the empirical Fisher: g g^T V
        gi = fn.gradients((x, y))[0]
        assert torch.equal(new, torch.outer(gi, gi @ V))


def test_hessian_products_refuses_an_unknown_curvature():
    model = nn.Linear(3, 2).double()
    fn = ModelFunction(model, Task(nn.MSELoss()))
    batch = (torch.randn(1, 3, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64))
    V = torch.randn(fn.numel, dtype=torch.float64)
    with pytest.raises(ValueError, match="curvature must be"):
        fn.hessian_products(batch, V, curvature="kfac")
    with pytest.raises(TypeError, match="unexpected keyword argument 'fisher'"):
        fn.hessian_products(batch, V, curvature="fisher", fisher="type2")
