"""AdaHessian: the update in closed form, the spatial average, a Newton step on a diagonal quadratic."""

from __future__ import annotations

import torch
from torch import nn

import second.optim as so
from second.optim.adahessian import adahessian_update


def test_update_closed_form_over_two_steps():
    p = torch.zeros(3, dtype=torch.float64)
    g1, g2 = torch.tensor([1.0, -2.0, 3.0]).double(), torch.tensor([0.5, 0.5, -1.0]).double()
    D1, D2 = torch.tensor([2.0, -1.0, 4.0]).double(), torch.tensor([1.0, 3.0, -2.0]).double()
    b1, b2, lr, eps = 0.9, 0.99, 0.1, 1e-6
    kw = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0, hessian_power=1.0)
    _, m, v = adahessian_update(p, g1, torch.zeros_like(p), torch.zeros_like(p), D1, 1, 1, **kw)
    u, m, v = adahessian_update(p, g2, m, v, D2, 2, 2, **kw)
    m_ref = (1 - b1) * (b1 * g1 + g2)
    v_ref = (1 - b2) * (b2 * D1**2 + D2**2)
    expect = -lr * (m_ref / (1 - b1**2)) / ((v_ref / (1 - b2**2)).sqrt() + eps)
    torch.testing.assert_close(u, expect)


def test_spatial_average_of_a_kernel():
    est = torch.arange(2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2) - 10
    kw = dict(lr=1.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, hessian_power=1.0)
    g = torch.ones_like(est)
    u, _, v = adahessian_update(
        torch.zeros_like(est), g, torch.zeros_like(est), torch.zeros_like(est), est, 1, 1, **kw
    )
    D = est.abs().mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(v, (D**2).expand_as(est))
    torch.testing.assert_close(u, -1.0 / D.expand_as(est))


def test_newton_step_on_a_diagonal_quadratic():
    d = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x = nn.Parameter(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    opt = so.AdaHessian([x], lr=1.0, betas=(0.0, 0.5), eps=0.0)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (d * x**2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # Hutchinson is exact on a diagonal Hessian: x - g/d = 0
    torch.testing.assert_close(x.detach(), torch.zeros(3, dtype=torch.float64))


def test_converges_on_logistic_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(6, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    net = nn.Linear(6, 3).double()
    opt = so.AdaHessian(net.parameters(), lr=0.1)
    for _ in range(300):

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(X), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
    assert float(loss) < 0.15
    assert float((net(X).argmax(1) == y).double().mean()) > 0.97
