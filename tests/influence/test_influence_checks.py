"""What an Influence refuses when it is built (influence/_checks.py): a damping that is not
a real scalar >= 0, batch norm that normalizes with the batch's statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from influence_cases import data, mlp
from second import Influence


@pytest.mark.parametrize(
    "damping",
    [
        np.float32(0.1),
        np.float64(0.1),
        np.array(0.1),
        torch.tensor(0.1),
        torch.tensor(0.1).double(),
    ],
    ids=["np.float32", "np.float64", "np.array0d", "tensor0d", "tensor0d64"],
)
def test_a_real_scalar_damping_of_any_kind(damping):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(12)
    kw = dict(curvature="ggn", method="dense", progressbar=False)
    inf = Influence(model, loss_fn, (X, y), damping=damping, **kw)
    assert isinstance(inf.damping, float)
    assert inf.damping == float(damping)
    plain = Influence(model, loss_fn, (X, y), damping=float(damping), **kw)
    assert torch.equal(inf.scores((X[:2], y[:2])), plain.scores((X[:2], y[:2])))


@pytest.mark.parametrize(
    "damping", [torch.tensor([0.1, 0.2]), np.array([0.1]), True, 1j, "0.1", torch.tensor(-1.0)]
)
def test_a_damping_that_is_not_a_real_scalar_is_refused(damping):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(6)
    with pytest.raises(ValueError, match="finite real number >= 0"):
        Influence(model, loss_fn, (X, y), damping=damping)


def test_batch_norm_without_running_statistics_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    model = nn.Sequential(model, nn.Linear(4, 3)).double().eval()
    X, y = data(10)
    with pytest.raises(ValueError, match="batch's statistics.*track_running_stats=False"):
        Influence(model, nn.CrossEntropyLoss(), (X, y), progressbar=False)
    # with running statistics, in eval mode, it is per example: accepted
    ok = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    Influence(ok, nn.CrossEntropyLoss(), (X, y), curvature="ggn", damping=0.1).scores((X, y))
