"""ggn_diagonal and the diagonal estimator's model-aware paths, against dense float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from second import GGNOperator, HessianOperator
from second.spectral import diagonal, ggn_diagonal

DIAG_TOL = dict(rtol=1e-10, atol=1e-12)  # exact in float64, up to summation order


def tiny(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).flatten(1))


CASES = {
    "mse-mean": (nn.MSELoss(), lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "mse-sum": (nn.MSELoss(reduction="sum"), lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "ce-mean": (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 3, (n,))),
    "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), lambda n: torch.randint(0, 3, (n,))),
    "bce": (nn.BCEWithLogitsLoss(), lambda n: torch.rand(n, 3, dtype=torch.float64).round()),
}


@pytest.mark.parametrize("name", list(CASES))
def test_against_the_dense_ggn_over_several_batches(name):
    loss_fn, targets = CASES[name]
    model = tiny()
    X, y = torch.randn(13, 4, dtype=torch.float64), targets(13)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    dense = torch.diagonal(GGNOperator(model, loss_fn, data).to_dense())
    torch.testing.assert_close(ggn_diagonal(model, loss_fn, data, chunk_size=4), dense, **DIAG_TOL)


def test_a_cnn_and_a_parameter_subset():
    torch.manual_seed(1)
    model = SmallCNN().double()
    X, y = torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (7,))
    params = [model.fc.weight, model.c.bias]
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y), params).to_dense())
    d = ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), params)
    torch.testing.assert_close(d, dense, **DIAG_TOL)
    with pytest.raises(ValueError, match="not parameters of the model"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), [torch.zeros(2, requires_grad=True)])


def test_diagonal_exact_on_a_ggn_operator_takes_no_operator_products():
    model = tiny()
    X, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    G = GGNOperator(model, nn.MSELoss(), (X, y))
    est = diagonal(G, method="exact", return_result=True)
    assert G.matvecs == 0 and est.matvecs == 0
    torch.testing.assert_close(est.value, torch.diagonal(G.to_dense()), **DIAG_TOL)


def test_hessian_diagonal_with_the_ggn_as_control_variate():
    model = tiny(out=3)
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    H = HessianOperator(model, nn.MSELoss(), (X, y))
    d = torch.diagonal(H.to_dense())
    plain = diagonal(H, 30, return_result=True)
    cv = diagonal(H, 30, control="ggn", return_result=True)
    err = lambda e: float((e.value - d).norm() / d.norm())  # noqa: E731
    assert err(cv) < 0.5 * err(plain)
    with pytest.raises(ValueError, match="control"):
        diagonal(GGNOperator(model, nn.MSELoss(), (X, y)), 10, control="ggn")
