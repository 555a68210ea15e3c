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


class SequenceModel(nn.Module):
    """A linear layer applied at every position, a strided dilated convolution, a shared head."""

    def __init__(self, shared=False):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1)
        self.tok = nn.Linear(4, 5)
        self.head = nn.Linear(5 + 3 * 2 * 2, 3)
        self.shared = shared

    def forward(self, x):  # x: [n, 2, 6, 6]
        seq = x.reshape(x.shape[0], -1, 4)[:, :9]  # [n, 9 positions, 4]
        h = torch.tanh(self.tok(seq)).mean(1)
        if self.shared:  # the same layer twice: not one record per layer
            h = torch.tanh(self.tok(seq[:, :3])).mean(1) + h
        z = torch.tanh(self.c(x)).flatten(1)
        return self.head(torch.cat([h, z], 1))


@pytest.mark.parametrize("method", ["auto", "layers", "vmap"])
@pytest.mark.parametrize("name", list(CASES))
def test_against_the_dense_ggn_over_several_batches(name, method):
    loss_fn, targets = CASES[name]
    model = tiny()
    X, y = torch.randn(13, 4, dtype=torch.float64), targets(13)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    dense = torch.diagonal(GGNOperator(model, loss_fn, data).to_dense())
    d = ggn_diagonal(model, loss_fn, data, chunk_size=4, method=method)
    torch.testing.assert_close(d, dense, **DIAG_TOL)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("method", ["auto", "layers", "vmap"])
def test_sequences_strided_convolutions_and_shared_layers(method, shared):
    torch.manual_seed(2)
    model = SequenceModel(shared).double()
    X, y = torch.randn(9, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    loss_fn = nn.CrossEntropyLoss()
    dense = torch.diagonal(GGNOperator(model, loss_fn, data).to_dense())
    if shared and method == "layers":  # a layer that runs twice has no per-layer formula
        with pytest.raises(ValueError, match="more than once"):
            ggn_diagonal(model, loss_fn, data, method=method)
        return
    d = ggn_diagonal(model, loss_fn, data, method=method, chunk_size=2)
    torch.testing.assert_close(d, dense, **DIAG_TOL)


def test_layers_method_refuses_other_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), method="layers")
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    torch.testing.assert_close(
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y)), dense, **DIAG_TOL
    )
    with pytest.raises(ValueError, match="method must be"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), method="backpack")


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


def test_a_recurrent_model_that_vmap_cannot_batch():
    """nn.GRU writes its hidden state in place: the per-example products loop, same diagonal."""
    from dense_reference import GRUNet

    torch.manual_seed(0)
    model = GRUNet().double()
    X, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    with pytest.warns(UserWarning, match="falling back to a loop over examples"):
        d = ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(d, dense, **DIAG_TOL)
