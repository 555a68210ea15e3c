"""Sophia and SophiaH: the clipped update in closed form, the estimate schedule, convergence."""

from __future__ import annotations

import torch
from torch import nn

import second.optim as so
from second.optim.sophia import sophia_update


def test_update_closed_form():
    p = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    g = torch.tensor([0.5, -0.5, 2.0, 1.0], dtype=torch.float64)
    h = torch.tensor([10.0, 10.0, 1.0, -3.0], dtype=torch.float64)
    u, m, hh = sophia_update(p, g, torch.zeros(4, dtype=torch.float64), h, None,
                             lr=0.1, betas=(0.5, 0.9), rho=0.5, eps=1e-12, weight_decay=0.2)  # fmt: skip
    torch.testing.assert_close(m, 0.5 * g)
    assert torch.equal(hh, h)  # no estimate: h unchanged
    ratio = torch.tensor([0.25 / 5, 0.25 / 5, 1.0, 1.0], dtype=torch.float64)  # clipped; h<0: sign
    expect = -0.1 * torch.sign(g) * ratio - 0.1 * 0.2 * p
    torch.testing.assert_close(u, expect)
    _, _, h2 = sophia_update(p, g, m, h, torch.ones(4, dtype=torch.float64),
                             lr=0.1, betas=(0.5, 0.9), rho=0.5, eps=1e-12, weight_decay=0.0)  # fmt: skip
    torch.testing.assert_close(h2, 0.9 * h + 0.1)


def test_sophiah_on_a_diagonal_quadratic_is_a_clipped_newton_step():
    # f = 1/2 sum d_i x_i^2: Hutchinson is exact (z_i^2 d_i = d_i); with beta = 0 and rho = 1
    # and lr = 1 the step is -g/d = -x (Newton), clipped at 1 per coordinate
    d = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x = nn.Parameter(torch.tensor([0.05, -0.05, 2.0], dtype=torch.float64))
    opt = so.SophiaH([x], lr=1.0, betas=(0.0, 0.0), rho=1.0, update_period=1)

    def closure():
        opt.zero_grad()
        loss = 0.5 * (d * x**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(x.detach(), torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert opt.state[x]["hessian"].equal(d)


def test_estimates_only_every_update_period():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    opt = so.Sophia(net, nn.CrossEntropyLoss(), update_period=3)
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    seen = []
    for _ in range(7):

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(X), y)
            loss.backward()
            return loss

        opt.step(closure)
        seen.append(opt.state[net.weight]["hessian"].clone())
    changed = [not torch.equal(a, b) for a, b in zip(seen, seen[1:])]
    assert changed == [False, False, True, False, False, True]
    assert opt.counters["n_steps"] == 7
    opt.close()


def test_sophia_converges_on_logistic_regression():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64)
    y = (X @ torch.randn(6, 3, generator=g, dtype=torch.float64)).argmax(1)
    for make in (
        lambda n: so.Sophia(n, nn.CrossEntropyLoss(), lr=0.05),
        lambda n: so.SophiaH(n.parameters(), lr=0.05),
    ):
        torch.manual_seed(0)
        net = nn.Linear(6, 3).double()
        opt = make(net)
        for _ in range(300):

            def closure(opt=opt, net=net):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(X), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
        assert float(loss) < 0.15
        assert float((net(X).argmax(1) == y).double().mean()) > 0.97
