"""Sophia and SophiaH: the clipped update in closed form, the estimate schedule, convergence."""

from __future__ import annotations

import torch
from torch import nn

import second.optim as so
from kfac_cases import TokenModel
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


def test_sophia_g_takes_its_estimate_on_the_loss_input_and_targets(monkeypatch):
    # logits [B, T, V] with the loss on out.reshape(-1, V): the estimate's curvature columns
    # are those of the loss as written (classes last, ignored targets weigh 0), not of the
    # output's dim 1; on average the estimate is the GGN diagonal of that loss
    import second
    from second.optim import _diagonal

    torch.manual_seed(0)
    model = TokenModel(12, 4).double()
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randint(0, 12, (5, 6), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 12, (5, 6), generator=torch.Generator().manual_seed(2))
    y[:, 4:] = -100  # padding
    seen = []
    real = _diagonal.gnb_diagonal

    def spy(f, fn, params, gen, target=None):
        seen.append((tuple(f.shape), target))
        return real(f, fn, params, gen, target)

    monkeypatch.setattr(so.sophia, "gnb_diagonal", spy)
    opt = so.Sophia(model, loss_fn, update_period=1)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x).reshape(-1, 12), y.reshape(-1))
        loss.backward()
        return loss

    opt.step(closure)
    assert seen[0][0] == (30, 12) and torch.equal(seen[0][1], y.reshape(-1))
    # the estimate's mean against the exact GGN diagonal (the same loss with [B, V, T] logits)
    ref_model = TokenModel(12, 4, classes_first=True).double()
    ref_model.load_state_dict(model.state_dict())
    G = second.GGNOperator(ref_model, loss_fn, (x, y)).to_dense()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(3)
    draws = 1000
    total = None
    for _ in range(draws):
        f = model(x).reshape(-1, 12)
        est = torch.cat([e.reshape(-1) for e in real(f, loss_fn, params, gen, y.reshape(-1))])
        total = est if total is None else total + est
    mean = total / draws
    exact = torch.diagonal(G)
    # 1,000 draws: 0.049 off; without the targets (padding counted) 0.097, the output's dim 1
    # as the classes 0.80
    assert float((mean - exact).norm() / exact.norm()) < 0.075


def test_sophia_g_ignores_loss_calls_without_gradients():
    # a metric logged under no_grad with the same loss module must not replace the loss' input
    torch.manual_seed(0)
    model = TokenModel(12, 4)
    loss_fn = nn.CrossEntropyLoss()
    opt = so.Sophia(model, loss_fn, update_period=1)
    x, y = torch.randint(0, 12, (3, 4)), torch.randint(0, 12, (3, 4))

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = loss_fn(out.reshape(-1, 12), y.reshape(-1))
        with torch.no_grad():
            loss_fn(out.reshape(-1, 12), y.reshape(-1))
        loss.backward()
        return loss

    first = float(opt.step(closure))
    for _ in range(20):
        last = float(opt.step(closure))
    assert last < first


def test_sophiah_a_parameter_without_an_estimate_takes_a_bounded_sign_step():
    # documented: where the running estimate is 0 (a group added between two estimates) the
    # step is the clipped one, sign(m) * lr, on every coordinate; Sophia needs no estimate
    # before a parameter's first step (AdaHessian does: see test_adahessian.py)
    a = nn.Parameter(torch.ones(2, dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0, 3.0], dtype=torch.float64))
    opt = so.SophiaH([a], lr=0.05, update_period=2)

    def closure():
        opt.zero_grad()
        loss = ((a - 2) ** 2).sum() + ((b - 2) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    opt.add_param_group({"params": [b]})
    opt.step(closure)
    torch.testing.assert_close(b.detach(), torch.tensor([1.05, 2.95], dtype=torch.float64))
    assert torch.equal(opt.state[b]["hessian"], torch.zeros(2, dtype=torch.float64))
