"""What every preconditioned optimizer (SOAP, Shampoo, Sophia, SophiaH, AdaHessian) owes torch.optim.

State-dict round trip (identical trajectory), refusal of another model's state, parameter
groups, hyperparameter validation, the closure contract, and the safety rule: a non-finite
gradient refuses the step, leaves parameters and state unchanged, is counted and warned once.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import second.optim as so
from preconditioner_cases import (
    LOSS,
    NAMES,
    OPTIONS,
    batch,
    build,
    closure_for,
    model,
    run,
    snapshot,
)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_continues_identically(name):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    run(opt, net, 3)
    params, sd = snapshot(opt, net)
    assert sd["state"], "the optimizer kept no state"
    after = run(opt, net, 4, seed0=3)
    net2 = model()
    with torch.no_grad():
        for p, q in zip(net2.parameters(), params):
            p.copy_(q)
    opt2 = build(name, net2, **OPTIONS[name])
    opt2.load_state_dict(sd)
    after2 = run(opt2, net2, 4, seed0=3)
    assert after == after2
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    # and the trajectory is not trivially constant
    assert not torch.equal(params[0], next(net.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_refuses_other_shapes(name):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    run(opt, net, 1)
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt2 = build(name, other, **OPTIONS[name])
    with pytest.raises(ValueError, match="other shapes"):
        opt2.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_nonfinite_gradient_refuses_the_step(name):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    run(opt, net, 2)
    params, sd = snapshot(opt, net)
    X, y = batch(7)
    X = X.clone()
    X[0, 0] = math.nan

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.step(closure_for(opt, net, X, y))
    refusals = [
        x for x in w if issubclass(x.category, RuntimeWarning) and "refused" in str(x.message)
    ]
    assert len(refusals) == 1, [str(x.message) for x in w]
    assert refusals[0].filename == __file__  # the opt.step line, not torch's step decorator
    assert opt.counters["n_refused"] == 2
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    now = opt.state_dict()
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                assert torch.equal(now["state"][pid][key], val), key
            elif key != "n_refused":
                assert now["state"][pid][key] == val, key
    # and it recovers on a finite batch
    run(opt, net, 1, seed0=8)
    assert not torch.equal(next(net.parameters()), params[0])


@pytest.mark.parametrize(
    "name, options",
    [
        ("SOAP", dict(precondition_1d=False)),
        ("SOAP", dict(max_precond_dim=0)),
        ("Shampoo", dict(max_precond_dim=0)),
    ],
)
def test_a_gradient_whose_square_overflows_refuses_the_step(name, options):
    # finite, but g * g overflows float32: the second moment would be inf and the update
    # m / (sqrt(inf) + eps) = 0 finite; committed, lerp(inf, .) is NaN from the next step on
    # and every later step was refused
    b = nn.Parameter(torch.zeros(3))
    opt = getattr(so, name)([b], weight_decay=0.0, **options)
    b.grad = torch.tensor([1.0, 2e19, -1.0])
    with pytest.warns(RuntimeWarning, match="moments have NaN or Inf"):
        opt.step()
    assert opt.counters["n_refused"] == 1 and "exp_avg_sq" not in opt.state[b]
    assert torch.equal(b.detach(), torch.zeros(3))
    for _ in range(3):
        b.grad = torch.ones(3)
        opt.step()
    assert opt.counters["n_refused"] == 1
    assert bool(torch.isfinite(opt.state[b]["exp_avg_sq"]).all())
    assert bool((b.detach() < 0).all())  # it trains again


@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups(name):
    net = model()
    first, last = list(net[0].parameters()), list(net[2].parameters())
    kw = {k: v for k, v in OPTIONS[name].items() if k != "lr"}
    groups = [{"params": first, "lr": 0.05}, {"params": last, "lr": 1e-12, "weight_decay": 0.0}]
    opt = build(name, net, params=groups, lr=0.05, **kw)
    before = [p.detach().clone() for p in last]
    before0 = [p.detach().clone() for p in first]
    run(opt, net, 3)
    assert all(torch.allclose(p, q, atol=1e-9) for p, q in zip(last, before))
    assert not all(torch.allclose(p, q) for p, q in zip(first, before0))
    with pytest.raises(ValueError):
        opt.add_param_group(
            {"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "lr": -1.0}
        )


BAD = [
    dict(lr=-1.0),
    dict(lr=math.nan),
    dict(betas=(1.0, 0.9)),
    dict(betas=(0.9, 1.0)),
    dict(weight_decay=-0.1),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", BAD, ids=[str(b) for b in BAD])
def test_hyperparameters_validated(name, bad):
    with pytest.raises(ValueError):
        build(name, model(), **bad)


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("SOAP", dict(precondition_frequency=0)),
        ("SOAP", dict(shampoo_beta=1.0)),
        ("Shampoo", dict(relative_damping=-1.0)),
        ("Shampoo", dict(graft="sgd")),
        ("Sophia", dict(rho=-1.0)),
        ("SophiaH", dict(update_period=0)),
        ("AdaHessian", dict(hessian_power=1.5)),
    ],
)
def test_specific_hyperparameters_validated(name, bad):
    with pytest.raises(ValueError):
        build(name, model(), **bad)


@pytest.mark.parametrize("name", ["SOAP", "Shampoo", "SophiaH", "AdaHessian"])
def test_model_instead_of_parameters_is_a_type_error(name):
    with pytest.raises(TypeError, match="parameters"):
        getattr(so, name)(model())


def test_sophia_refuses_a_loss_without_output_curvature():
    with pytest.raises(NotImplementedError):
        so.Sophia(model(), nn.L1Loss())


@pytest.mark.parametrize("name", ["SOAP", "Shampoo"])
def test_no_closure_needed(name):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    X, y = batch()
    ref = [p.detach().clone() for p in net.parameters()]
    LOSS(net(X), y).backward()
    assert opt.step() is None
    assert not torch.equal(next(net.parameters()), ref[0])


@pytest.mark.parametrize("name", ["SophiaH", "AdaHessian"])
def test_hutchinson_without_closure_needs_the_graph(name):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    X, y = batch()
    LOSS(net(X), y).backward()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    # the documented alternative: backward(create_graph=True), then step(); same as a closure
    net2 = model()
    opt2 = build(name, net2, **OPTIONS[name])
    opt2.zero_grad()
    LOSS(net2(X), y).backward(create_graph=True)
    opt2.step()
    net3 = model()
    opt3 = build(name, net3, **OPTIONS[name])
    opt3.step(closure_for(opt3, net3, X, y))
    for p, q in zip(net2.parameters(), net3.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_sophia_without_closure_on_an_estimate_step_raises():
    net = model()
    opt = build("Sophia", net, **OPTIONS["Sophia"])
    X, y = batch()
    LOSS(net(X), y).backward()
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


@pytest.mark.parametrize("name", ["SophiaH", "AdaHessian", "Sophia"])
def test_closure_contract_leaves_the_gradient(name):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    X, y = batch()
    ref = copy.deepcopy(net)
    loss = opt.step(closure_for(opt, net, X, y))
    LOSS(ref(X), y).backward()
    assert not loss.requires_grad
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
        assert p.grad.grad_fn is None


# -- parameters the loss does not use, refused groups, duplicates --------------------------


def _with_unused(net):
    """Groups of ``net``'s parameters plus one the loss never uses (float64)."""
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    return [{"params": list(net.parameters())}, {"params": [extra]}], extra


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_the_loss_does_not_use_is_skipped(name):
    """torch.optim's rule: no gradient, no step, no state; the others step as without it."""
    net, ref = model(), model()
    groups, extra = _with_unused(net)
    opt = build(name, net, params=groups, **OPTIONS[name], weight_decay=0.1)
    opt_ref = build(name, ref, **OPTIONS[name], weight_decay=0.1)
    run(opt, net, 3)
    run(opt_ref, ref, 3)
    assert torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))  # no weight decay
    assert extra.grad is None
    assert not opt.state.get(extra)  # no state
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["SophiaH", "AdaHessian"])
def test_without_closure_a_parameter_without_gradient_is_skipped(name):
    """``loss.backward(create_graph=True)`` then ``step()``: a ``None`` grad is no error."""
    net, ref = model(), model()
    groups, extra = _with_unused(net)
    opt = build(name, net, params=groups, **OPTIONS[name])
    opt_ref = build(name, ref, **OPTIONS[name])
    for k in range(3):
        X, y = batch(k)
        for o, m in ((opt, net), (opt_ref, ref)):
            o.zero_grad()
            LOSS(m(X), y).backward(create_graph=True)
            o.step()
    assert torch.equal(extra.detach(), torch.ones(3, dtype=torch.float64))
    assert not opt.state.get(extra)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("name", "bad"),
    [(n, dict(lr=-1.0)) for n in NAMES]
    + [("SophiaH", dict(update_period=3)), ("AdaHessian", dict(update_period=3))],
)
def test_a_refused_parameter_group_is_not_kept(name, bad):
    net = model()
    opt = build(name, net, **OPTIONS[name])
    b = nn.Parameter(torch.ones(2, dtype=torch.float64))
    groups = list(opt.param_groups)
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [b], **bad})
    assert opt.param_groups == groups
    run(opt, net, 1)
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(2, dtype=torch.float64))
    # the same parameter can still be added properly
    opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == len(groups) + 1


@pytest.mark.parametrize("name", NAMES)
def test_a_parameter_listed_twice_is_refused(name):
    net = model()
    w = net[0].weight
    with pytest.raises(ValueError, match="listed twice"):
        build(name, net, params=[w, net[0].bias, w], **OPTIONS[name])
    opt = build(name, net, params=[net[0].weight], **OPTIONS[name])
    with pytest.raises(ValueError, match="listed twice"):
        opt.add_param_group({"params": [net[2].weight, net[2].weight]})
    assert len(opt.param_groups) == 1


@pytest.mark.slow  # compilation takes 10-20 CPU-s per optimizer
@pytest.mark.parametrize("name", ["SOAP", "Shampoo"])
def test_a_compiled_step_takes_the_eager_steps(name):
    # torch.compile(opt.step) runs (Shampoo's step had a graph break whose resumed frame
    # failed in dynamo's shape propagation) and takes the same steps, in float64
    import torch._dynamo

    def run(compiled: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        ).double()
        opt = getattr(so, name)(net.parameters())
        step = torch.compile(opt.step) if compiled else opt.step
        X = torch.randn(64, 16, dtype=torch.float64)
        y = torch.randn(64, 4, dtype=torch.float64)
        for _ in range(12):  # past a refresh of the eigenbases (every 10 steps)
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(X), y).backward()
            step()
        return [p.detach().clone() for p in net.parameters()]

    torch._dynamo.reset()
    try:
        eager, compiled = run(False), run(True)
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
