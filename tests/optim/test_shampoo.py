"""Shampoo against dense references: the inverse fourth roots, one optimizer step, convergence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import second.optim as so
from second.kfac import EigenBlock
from second.optim.shampoo import shampoo_direction

TOL = dict(rtol=1e-10, atol=1e-12)  # float64, one eigendecomposition


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=torch.float64)
    return B @ B.T + 0.1 * torch.eye(n, dtype=torch.float64)


def _power(M, p):
    lam, Q = torch.linalg.eigh(M)
    return (Q * lam.pow(p)) @ Q.T


def test_direction_is_L_inv_quarter_G_R_inv_quarter():
    L, R = _spd(3, 0), _spd(4, 1)
    G = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = shampoo_direction(G, EigenBlock.from_factors(R, L))
    torch.testing.assert_close(got, _power(L, -0.25) @ G @ _power(R, -0.25), **TOL)


def test_damped_direction_is_the_damped_kronecker_root():
    L, R = _spd(3, 3), _spd(2, 4)
    G = torch.randn(3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    lam = 0.7
    dense = _power(torch.kron(L, R) + lam * torch.eye(6, dtype=torch.float64), -0.25)
    got = shampoo_direction(G, EigenBlock.from_factors(R, L), damping=lam)
    torch.testing.assert_close(got.reshape(-1), dense @ G.reshape(-1), **TOL)


def test_one_step_without_grafting_matches_dense():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    G = torch.randn(3, 4, dtype=torch.float64)
    W0 = W.detach().clone()
    damping, lr = 1e-3, 0.1
    opt = so.Shampoo(
        [W], lr=lr, betas=(0.0, 0.5), weight_decay=0.0, relative_damping=damping, graft=None
    )
    W.grad = G.clone()
    opt.step()
    K = torch.kron(G @ G.T, G.T @ G)  # bias-corrected factors after one step
    lam = damping * float(torch.linalg.eigvalsh(K).max())
    root = _power(K + lam * torch.eye(12, dtype=torch.float64), -0.25)
    torch.testing.assert_close(W.detach(), W0 - lr * (root @ G.reshape(-1)).reshape(3, 4), **TOL)


def test_grafting_gives_adams_norm():
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    W0 = W.detach().clone()
    G = torch.randn(3, 4, dtype=torch.float64)
    opt = so.Shampoo([W], lr=0.1, eps=0.0, weight_decay=0.0)
    W.grad = G.clone()
    opt.step()
    # Adam's first step is lr * sign(g): norm lr * sqrt(12)
    torch.testing.assert_close(
        (W.detach() - W0).norm(), torch.tensor(0.1 * 12**0.5, dtype=torch.float64)
    )


def test_converges_on_a_least_squares_problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 5, generator=g, dtype=torch.float64) @ torch.diag(
        torch.tensor([10.0, 3.0, 1.0, 0.3, 0.1], dtype=torch.float64)
    )
    W_true = torch.randn(2, 5, generator=g, dtype=torch.float64)
    Y = X @ W_true.T
    net = nn.Linear(5, 2, bias=False).double()
    opt = so.Shampoo(net.parameters(), lr=0.02, weight_decay=0.0)
    for _ in range(600):
        opt.zero_grad()
        loss = ((net(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
    assert float(loss) < 1e-3 * float((Y**2).mean())


def test_damping_is_the_deprecated_spelling_of_relative_damping():
    W = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    with pytest.warns(DeprecationWarning, match="relative_damping"):
        opt = so.Shampoo([W], damping=1e-3)
    assert opt.param_groups[0]["relative_damping"] == 1e-3 and "damping" not in opt.defaults
    with pytest.raises(ValueError, match="relative_damping only"):
        with pytest.warns(DeprecationWarning):
            so.Shampoo([W], damping=1e-3, relative_damping=1e-2)
    # a state saved before the renaming loads under the new name, and steps
    sd = so.Shampoo([W], relative_damping=1e-3).state_dict()
    sd["param_groups"][0]["damping"] = sd["param_groups"][0].pop("relative_damping")
    fresh = so.Shampoo([W])
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["relative_damping"] == 1e-3
    W.grad = torch.ones_like(W)
    fresh.step()
    assert fresh.counters["n_refused"] == 0
