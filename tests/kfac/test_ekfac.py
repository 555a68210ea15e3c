"""EKFACOperator (kfac/ekfac.py): KFAC's eigenbasis with re-fitted eigenvalues, and its inverse."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_cases import DT, INVERSE_TOL, LOSSES, dense_ggn, layer_blocks, tanh_net
from second import EKFACOperator, KFACOperator

EKFAC_SLACK = 1e-10  # EK-FAC error <= KFAC error + this * ||block|| (both exact: roundoff)


@pytest.mark.parametrize("loss", ["mse-mean", "ce-mean", "bce-sum"])
def test_ekfac_at_least_as_accurate_as_kfac(loss):
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = tanh_net(), make_loss()
    X, y = torch.randn(16, 4, dtype=DT), make_y(16, 3)
    G = dense_ggn(model, loss_fn, X, y)
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    E = EKFACOperator(model, loss_fn, (X, y)).to_dense()
    for s in layer_blocks(model):
        err_k = torch.linalg.norm(K[s, s] - G[s, s])
        err_e = torch.linalg.norm(E[s, s] - G[s, s])
        assert err_e <= err_k + EKFAC_SLACK * torch.linalg.norm(G[s, s])
    assert torch.linalg.norm(E - E.T) < 1e-12


def test_ekfac_inverse_and_errors():
    model = tanh_net()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    E = EKFACOperator(model, nn.MSELoss(), (X, y))
    n = E.shape[0]
    torch.testing.assert_close(
        E.inverse(damping=0.2).to_dense(),
        torch.linalg.inv(E.to_dense() + 0.2 * torch.eye(n, dtype=DT)),
        **INVERSE_TOL,
    )
    with pytest.raises(ValueError, match="per-factor"):
        E.inverse(damping=0.2, pi_damping=True)
