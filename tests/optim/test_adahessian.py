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


# -- a parameter's first step with update_period > 1 ---------------------------------------

CURV = {"a": torch.tensor([2.0, 8.0], dtype=torch.float64), "b": torch.tensor([4.0, 0.5]).double()}
TARGET = 2.0
KW = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-4)


def _quadratic(a, b):
    """Separable: Hutchinson's z * Hz is the exact Hessian diagonal, whatever the signs."""
    return 0.5 * (CURV["a"] * (a - TARGET) ** 2).sum() + 0.5 * (CURV["b"] * (b - TARGET) ** 2).sum()


def _reference(x0, curv, steps, estimate_at):
    """AdaHessian's formula in float64 for one parameter of the quadratic.

    ``steps`` are the optimizer steps it takes part in, ``estimate_at`` those with an estimate.
    """
    lr, (b1, b2), eps = KW["lr"], KW["betas"], KW["eps"]
    x, m, v, k = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0), 0
    for t, s in enumerate(steps, start=1):
        g = curv * (x - TARGET)
        m = b1 * m + (1 - b1) * g
        if s in estimate_at:
            k += 1
            v = b2 * v + (1 - b2) * curv**2
        x = x - lr * (m / (1 - b1**t)) / ((v / (1 - b2**k)).sqrt() + eps)
    return x


def _params():
    return (
        nn.Parameter(torch.ones(2, dtype=torch.float64)),
        nn.Parameter(torch.ones(2, dtype=torch.float64)),
    )


def test_a_group_added_late_takes_its_first_step_with_an_estimate():
    # update_period=2: estimates on steps 1, 3, 5; b joins on step 2, off the schedule, and
    # gets its first estimate there (without one its step was lr * m / eps: b went to 1001)
    a, b = _params()
    opt = so.AdaHessian([a], update_period=2, **KW)

    def closure():
        opt.zero_grad()
        loss = _quadratic(a, b)
        loss.backward()
        return loss

    opt.step(closure)
    opt.add_param_group({"params": [b]})
    for _ in range(4):
        opt.step(closure)
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(a.detach(), _reference(ones, CURV["a"], range(1, 6), {1, 3, 5}))
    torch.testing.assert_close(b.detach(), _reference(ones, CURV["b"], range(2, 6), {2, 3, 5}))
    # a's estimates stay on the schedule
    assert opt.state[a]["hessian_step"] == 3 and opt.state[b]["hessian_step"] == 3


class _Counted(torch.autograd.Function):
    """The identity, counting the backward passes through it (a differentiable backward)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _Counted.calls += 1
        return g * 1.0


def test_an_off_schedule_first_estimate_differentiates_the_late_parameters_alone():
    # b's first estimate on step 2 (off the schedule) needs b's gradient with its graph and a
    # product through b's part of the model; a (estimated on the schedule) is not
    # differentiated again: the only backward through a's branch is the closure's
    a, b = _params()
    opt = so.AdaHessian([a], update_period=2, **KW)

    def closure():
        opt.zero_grad()
        loss = _quadratic(_Counted.apply(a), b)
        loss.backward()
        return loss

    opt.step(closure)
    opt.add_param_group({"params": [b]})
    _Counted.calls = 0
    opt.step(closure)
    assert _Counted.calls == 1
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(b.detach(), _reference(ones, CURV["b"], [2], {2}))
    torch.testing.assert_close(a.detach(), _reference(ones, CURV["a"], [1, 2], {1}))
    assert opt.state[a]["hessian_step"] == 1 and opt.state[b]["hessian_step"] == 1


def test_an_unfrozen_parameter_takes_its_first_step_with_an_estimate():
    a, b = _params()
    b.requires_grad_(False)
    opt = so.AdaHessian([a, b], update_period=2, **KW)

    def closure():
        opt.zero_grad()
        loss = _quadratic(a, b)
        loss.backward()
        return loss

    opt.step(closure)
    b.requires_grad_(True)
    opt.step(closure)
    opt.step(closure)
    ones = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(b.detach(), _reference(ones, CURV["b"], [2, 3], {2, 3}))
    assert float(b.detach().max()) < 1.2  # a step of about lr, not lr / eps


def test_without_closure_the_first_estimate_needs_the_graph():
    # a late parameter's first gradient without create_graph: it waits (no step, no state)
    # for a step that brings the graph (here the next scheduled estimate)
    a, b = _params()
    opt = so.AdaHessian([a], update_period=2, **KW)
    ones = torch.ones(2, dtype=torch.float64)
    for step, create_graph in ((1, True), (2, False), (3, True)):
        if step == 2:
            opt.add_param_group({"params": [b]})
        opt.zero_grad()
        _quadratic(a, b).backward(create_graph=create_graph)
        opt.step()
        if step == 2:
            assert torch.equal(b.detach(), ones) and b not in opt.state
    torch.testing.assert_close(a.detach(), _reference(ones, CURV["a"], [1, 2, 3], {1, 3}))
    torch.testing.assert_close(b.detach(), _reference(ones, CURV["b"], [3], {3}))
    # with the graph, the late parameter is estimated (and stepped) off the schedule
    a, b = _params()
    opt = so.AdaHessian([a], update_period=2, **KW)
    for step in (1, 2):
        if step == 2:
            opt.add_param_group({"params": [b]})
        opt.zero_grad()
        _quadratic(a, b).backward(create_graph=True)
        opt.step()
    torch.testing.assert_close(b.detach(), _reference(ones, CURV["b"], [2], {2}))


def test_a_late_first_estimate_through_fused_attention():
    # the off-schedule estimate differentiates twice: the closure's forward runs in the math
    # attention kernel while a parameter waits for its first estimate
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    head = nn.Linear(8, 1).double()
    X, y = torch.randn(6, 4, 8, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    opt = so.AdaHessian(block.parameters(), lr=0.01, update_period=3)

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((head(block(X).mean(1)) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    before = head.weight.detach().clone()
    opt.add_param_group({"params": list(head.parameters())})
    opt.step(closure)  # off the schedule: the head's first step, with its estimate
    st = opt.state[head.weight]
    assert st["hessian_step"] == 1 and bool((st["exp_avg_hessian_sq"] > 0).all())
    # the first step's formula, t = k = 1: -lr * g / (|D| + eps), not -lr * g / eps
    (b1, b2), eps = opt.param_groups[0]["betas"], opt.param_groups[0]["eps"]
    g, D = st["exp_avg"] / (1 - b1), (st["exp_avg_hessian_sq"] / (1 - b2)).sqrt()
    torch.testing.assert_close(head.weight.detach() - before, -0.01 * g / (D + eps))
