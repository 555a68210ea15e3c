"""The shared shell of the Newton-type optimizers (optim/_base.py): state dicts,
hyperparameter validation, the evaluation cache."""

from __future__ import annotations

import pytest
import torch

from newton_cases import (
    DT,
    EXACT,
    ResidualModel,
    contract,
    least_squares_closure,
    quadratic_problem,
    rosen,
    rosen_residual,
)
from second.optim import (
    GaussNewton,
    HessianFree,
    LiSSA,
    NewtonCG,
)

BAD = [
    (NewtonCG, dict(initial_radius=0.0)),
    (NewtonCG, dict(initial_radius=2.0, max_radius=1.0)),
    (NewtonCG, dict(eta=0.3)),
    (NewtonCG, dict(maxiter=0)),
    (NewtonCG, dict(cg_tol=1.5)),
    (NewtonCG, dict(gtol=-1.0)),
    (NewtonCG, dict(preconditioner=3)),
    (GaussNewton, dict(damping=-1.0)),
    (GaussNewton, dict(damping=1e-20)),
    (GaussNewton, dict(solver="qr")),
    (GaussNewton, dict(eta=1.0)),
    (GaussNewton, dict(cg_maxiter=0)),
    (HessianFree, dict(damping=0.0)),
    (HessianFree, dict(curvature="fisher")),
    (HessianFree, dict(cg_decay=1.5)),
    (HessianFree, dict(boost=0.5)),
    (HessianFree, dict(drop=1.0)),
    (HessianFree, dict(max_line_search=-1)),
    (LiSSA, dict(lr=0.0)),
    (LiSSA, dict(depth=0)),
    (LiSSA, dict(scale=-1.0)),
    (LiSSA, dict(scale_margin=0.5)),
    (LiSSA, dict(damping=-1.0)),
]


def _make(cls, x0):
    """``(optimizer, its parameter, torch.optim's closure)`` on Rosenbrock (least squares for
    the Gauss-Newton-type optimizers, built from a model)."""
    if cls in (GaussNewton, HessianFree):
        model = ResidualModel(rosen_residual, x0)
        opt = cls(model)
        return opt, model.x, least_squares_closure(opt, model)
    x = torch.as_tensor(x0, dtype=DT).clone().requires_grad_(True)
    opt = cls([x], **({"depth": 20} if cls is LiSSA else {}))
    return opt, x, contract(opt, lambda: rosen(x))


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree, LiSSA])
def test_state_dict_round_trip(cls):
    x0 = [-1.2, 1.0] if cls is not LiSSA else [0.9, 0.8]  # LiSSA needs convexity
    opt, x, closure = _make(cls, x0)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    opt2, x2, closure2 = _make(cls, x.detach())
    opt2.load_state_dict(sd)
    s1, s2 = opt.state[x], opt2.state[x2]
    assert set(s1) == set(s2)
    for k in ("n_iter", "nfev", "ngev", "matvecs", "radius", "damping", "scale"):
        if k in s1:
            assert s1[k] == s2[k]
    assert opt2.param_groups[0] == {**opt.param_groups[0], "params": opt2.param_groups[0]["params"]}
    # the reloaded optimizer continues exactly like the original
    opt.step(closure)
    opt2.step(closure2)
    torch.testing.assert_close(x2.detach(), x.detach(), **EXACT)


@pytest.mark.parametrize(("cls", "kwargs"), BAD)
def test_bad_hyperparameters_raise(cls, kwargs):
    x = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError):
        cls([x], **kwargs)


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree, LiSSA])
def test_parameter_groups_and_missing_closure_raise(cls):
    a = torch.ones(2, dtype=DT, requires_grad=True)
    b = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="parameter groups"):
        cls([{"params": [a]}, {"params": [b]}])
    with pytest.raises(ValueError, match="closure"):
        cls([a]).step(None)


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton])
def test_a_new_closure_is_evaluated_afresh(cls):
    """Mini-batch use: a new closure object (new batch) is not served the cached evaluation."""
    g = torch.Generator().manual_seed(0)
    XA, XB = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 3, generator=g, dtype=DT)
    yA, yB = torch.randn(20, 1, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    model = torch.nn.Linear(3, 1).to(DT)

    opt = cls(model.parameters() if cls is NewtonCG else model)

    def make(X, y):
        return contract(opt, lambda: torch.nn.functional.mse_loss(model(X), y))

    cA = make(XA, yA)
    opt.step(cA)
    opt.step(cA)  # same closure: reuses the accepted trial's evaluation
    nfev = opt.state[model.weight]["nfev"]
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(XB), yB))
    opt.step(make(XB, yB))
    assert opt.history[-1]["loss"] == pytest.approx(expected, rel=1e-12)
    assert opt.state[model.weight]["nfev"] == nfev + 2  # fresh evaluation + one trial


# -- parameter groups, duplicates, frozen parameters, the returned loss ---------------------

ALL = [NewtonCG, GaussNewton, HessianFree, LiSSA]


@pytest.mark.parametrize("cls", ALL)
def test_add_param_group_is_refused_and_changes_nothing(cls):
    """The constructor refuses several groups; a group added later was never optimized."""
    a = torch.ones(2, dtype=DT, requires_grad=True)
    b = torch.zeros(2, dtype=DT, requires_grad=True)
    opt = cls([a])
    with pytest.raises(ValueError, match="parameter groups"):
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [a]


@pytest.mark.parametrize("cls", ALL)
def test_a_parameter_listed_twice_is_refused(cls):
    # NewtonCG solved for the coordinates twice: one exact-Newton step ended 0.69 away
    x = torch.ones(2, dtype=DT, requires_grad=True)
    with pytest.raises(ValueError, match="listed twice"):
        cls([x, x])


@pytest.mark.parametrize("cls", [NewtonCG, LiSSA])
def test_a_frozen_parameter_is_skipped(cls):
    # torch.optim's rule, as GaussNewton and HessianFree built from a model: a parameter that
    # does not require grad is not optimized (it raised a raw autograd error)
    A, b, _, _ = quadratic_problem(4)
    x = torch.zeros(3, dtype=DT, requires_grad=True)
    frozen = torch.full((1,), 0.5, dtype=DT)  # the last coordinate, held fixed
    opt = cls([x, frozen], **({"depth": 400} if cls is LiSSA else {"maxiter": 10}))
    closure = contract(opt, lambda: 0.5 * torch.cat([x, frozen]) @ A @ torch.cat([x, frozen])
                       - b @ torch.cat([x, frozen]))  # fmt: skip
    for _ in range(10):
        opt.step(closure)
    # the minimizer over the first three coordinates with the fourth at 0.5 (float64)
    expect = torch.linalg.solve(A[:3, :3], b[:3] - A[:3, 3] * 0.5)
    torch.testing.assert_close(x.detach(), expect, rtol=1e-8, atol=1e-8)
    assert torch.equal(frozen, torch.full((1,), 0.5, dtype=DT)) and frozen.grad is None
    sd = opt.state_dict()  # the state dict still describes both parameters
    assert sd["param_shapes"] == [[3], [1]]


@pytest.mark.parametrize("cls", ALL)
def test_step_returns_the_closures_loss_tensor(cls):
    # as torch.optim.LBFGS: the closure's own loss (detached), in its dtype; it was a float32
    # tensor built from a Python float (4.000000003141593 came back as tensor(4.))
    shift = 3.141592653589793e-9
    if cls in (GaussNewton, HessianFree):
        model = ResidualModel(lambda x: x - 2.0, [0.0, 0.0])
        opt = cls(model)
        closure = contract(opt, lambda: 0.5 * model().square().sum() + shift)
    else:
        x = torch.zeros(2, dtype=DT, requires_grad=True)
        opt = cls([x])
        closure = contract(opt, lambda: 0.5 * ((x - 2) ** 2).sum() + shift)
    expect = 4.0 + shift  # at the start, x = 0
    loss = opt.step(closure)
    assert loss.dtype == DT and not loss.requires_grad
    assert float(loss) == expect


@pytest.mark.parametrize("cls", [NewtonCG, LiSSA])
def test_a_nan_loss_is_named_as_such(cls):
    from second import NonFiniteError

    x = torch.ones(2, dtype=DT, requires_grad=True)
    opt = cls([x])
    with pytest.raises(NonFiniteError, match="loss is not finite"):
        opt.step(contract(opt, lambda: (x**2).sum() * float("nan")))
    assert torch.equal(x.detach(), torch.ones(2, dtype=DT))


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree])
def test_a_learning_rate_scheduler_says_there_is_no_learning_rate(cls):
    x = torch.ones(2, dtype=DT, requires_grad=True)
    opt = cls([x])
    with pytest.raises(KeyError, match="no learning rate"):
        torch.optim.lr_scheduler.StepLR(opt, 1)
    # the group still reads and saves as a plain dict
    assert "lr" not in opt.param_groups[0] and opt.param_groups[0].get("lr") is None
    opt.load_state_dict(opt.state_dict())
    with pytest.raises(KeyError, match="no learning rate"):
        torch.optim.lr_scheduler.StepLR(opt, 1)
