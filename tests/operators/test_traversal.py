"""The data traversal of the dataset-level operators (``operators/_traversal.py``).

The same batches on every pass, a stochastic model refused, and the per-batch graphs
kept across products: rebuilt after an optimizer step, forgotten by ``refresh``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import PRODUCT_TOL
from dense_reference import (
    SPLIT,
    assert_close,
    make_problem,
    ref_ggn,
    ref_hessian,
    split_batches,
)
from second import FisherOperator, GGNOperator, HessianOperator, NonDeterministicDataError

TOL = PRODUCT_TOL[torch.float64]


def test_shuffling_dataloader_is_detected():
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", "mean", torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=3, shuffle=True)
    op = HessianOperator(model64, loss_fn, loader)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(NonDeterministicDataError, match="shuffle"):
        for _ in range(5):  # the first pass records the batches, a later one differs
            op @ v
    # the check can be switched off deliberately
    op = HessianOperator(model64, loss_fn, loader, check_deterministic=False)
    for _ in range(3):
        assert torch.isfinite(op @ v).all()


def test_data_yielding_fewer_batches_on_a_later_pass_is_detected():
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", "mean", torch.float64)
    batches = split_batches(X, y, SPLIT)

    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches if self.passes == 1 else batches[:-1])

    op = GGNOperator(model64, loss_fn, Shrinking())
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with pytest.raises(NonDeterministicDataError, match="batches"):
        op @ v


def test_dropout_in_training_mode_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randn(8, 3)
    for cls in (HessianOperator, GGNOperator, FisherOperator):
        with pytest.raises(NonDeterministicDataError, match="dropout"):
            cls(model, nn.MSELoss(), (X, y))
    model.eval()
    op = HessianOperator(model, nn.MSELoss(), (X, y))
    assert torch.isfinite(op @ torch.ones(op.shape[0])).all()
    # dropout with p=0 is deterministic, and the check can be turned off
    model.train()
    HessianOperator(model, nn.MSELoss(), (X, y), check_deterministic=False)
    model[1].p = 0.0
    HessianOperator(model, nn.MSELoss(), (X, y))


def test_batchnorm_in_training_mode_raises_and_buffers_stay_untouched_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randn(8, 3)
    with pytest.raises(NonDeterministicDataError, match="running statistics"):
        GGNOperator(model, nn.MSELoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    model.eval()
    before = model[1].running_mean.clone()
    op = GGNOperator(model, nn.MSELoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    op @ torch.ones(op.shape[0])
    op @ torch.ones(op.shape[0])
    assert torch.equal(model[1].running_mean, before)


def test_refresh_after_parameter_update():
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "ce", "mean", torch.float64)
    H = HessianOperator(model64, loss_fn, (X, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert_close(H @ v, ref_hessian(model64, loss_fn, X, y) @ v, PRODUCT_TOL[torch.float64])
    with torch.no_grad():
        for p in model64.parameters():
            p.add_(0.1)
    H.refresh()
    assert_close(H @ v, ref_hessian(model64, loss_fn, X, y) @ v, PRODUCT_TOL[torch.float64])


# -------------------------------------------------------------------------- kept graphs
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("cache_graphs", [False, True])
def test_kept_graphs_follow_an_optimizer_step(cls, cache_graphs):
    """Regression: the kept graphs raised autograd's "modified by an inplace operation"."""
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "ce", "mean", torch.float64)
    reference = ref_hessian if cls is HessianOperator else ref_ggn
    data = split_batches(X, y, SPLIT) if cache_graphs else (X, y)
    op = cls(model64, loss_fn, data, cache_graphs=cache_graphs)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert_close(op @ v, reference(model64, loss_fn, X, y) @ v, TOL)
    assert op._kept_states() is op._kept_states()  # unchanged parameters: kept
    opt = torch.optim.SGD(model64.parameters(), lr=0.5)
    loss_fn(model64(X), y).backward()
    opt.step()
    assert_close(op @ v, reference(model64, loss_fn, X, y) @ v, TOL)
    # a write through .data bumps no version counter: refresh() is needed
    for p in model64.parameters():
        p.data.mul_(1.5)
    op.refresh()
    assert_close(op @ v, reference(model64, loss_fn, X, y) @ v, TOL)
