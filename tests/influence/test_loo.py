"""Influence.newton_loo with losses whose backward torch cannot differentiate forward-mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dense_reference import ref_ggn, ref_hessian, ref_per_example_gradients
from second import Influence

# Tolerance: relative error of the whole result against a dense float64 reference.
NEWTON_RTOL = 1e-9
DAMPING = 2.0  # keeps every leave-one-out curvature positive definite (no fallback)


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def newton_reference(model, loss_fn, train, test, idx, kind):
    """``g_t . d + 1/2 d^T H_t d`` with ``d = (C + damping I - C_j / n)^{-1} g_j / n``."""
    X, y = train
    n = X.shape[0]
    curv = ref_hessian if kind == "hessian" else ref_ggn
    A = curv(model, loss_fn, X, y) + DAMPING * torch.eye(sum(p.numel() for p in model.parameters()))
    Gt = ref_per_example_gradients(model, loss_fn, *test)
    out = torch.zeros(test[0].shape[0], len(idx), dtype=torch.float64)
    for k, j in enumerate(idx):
        one = (X[j : j + 1], y[j : j + 1])
        g = ref_per_example_gradients(model, loss_fn, *one)[0]
        d = torch.linalg.solve(A - curv(model, loss_fn, *one) / n, g / n)
        for i in range(test[0].shape[0]):
            Ht = ref_hessian(model, loss_fn, test[0][i : i + 1], test[1][i : i + 1])
            out[i, k] = Gt[i] @ d + 0.5 * d @ Ht @ d
    return out


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.HuberLoss(delta=0.5)], ids=["mse", "huber"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_newton_loo_with_regression_losses_matches_dense_reference(loss_fn, kind, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    test, idx = (X[:2] + 0.1, y[:2]), [0, 5, 11]
    ref = newton_reference(model, loss_fn, (X, y), test, idx, kind)
    inf = Influence(model, loss_fn, (X, y), curvature=kind, method=method, damping=DAMPING)
    assert rel(inf.newton_loo(test, idx), ref) < NEWTON_RTOL


def test_newton_loo_with_mse_and_kfac_equals_the_ggn_of_a_linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    kfac = Influence(model, nn.MSELoss(), (X, y), curvature="kfac", damping=DAMPING)
    exact = Influence(model, nn.MSELoss(), (X, y), curvature="ggn", damping=DAMPING)
    # K-FAC is exact for a one-output linear regression
    assert (
        rel(kfac.newton_loo((X[:2], y[:2]), [1, 4]), exact.newton_loo((X[:2], y[:2]), [1, 4]))
        < NEWTON_RTOL
    )
