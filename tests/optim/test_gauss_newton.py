"""second.optim.GaussNewton (optim/gauss_newton.py): Levenberg-Marquardt on the GGN."""

from __future__ import annotations

import pytest
import torch

from newton_cases import (
    DT,
    EXACT,
    SOLUTION_TOL,
    ResidualModel,
    contract,
    least_squares_closure,
    rosen_residual,
)
from second.optim import (
    GaussNewton,
    minimize,
)
from second.optim.gauss_newton import lm_damping_update


@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_gauss_newton_linear_least_squares_in_one_step(solver):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, 1, generator=g, dtype=DT)
    model = torch.nn.Linear(4, 1).to(DT)
    opt = GaussNewton(model, damping=1e-12, solver=solver, cg_tol=1e-12, gtol=1e-10)
    closure = contract(opt, lambda: torch.nn.functional.mse_loss(model(X), y))

    opt.step(closure)
    A = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(A, y).solution.reshape(-1)
    got = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(got, sol, rtol=0, atol=SOLUTION_TOL)
    opt.step(closure)
    assert opt.converged


def test_lm_damping_rises_on_rejected_steps():
    assert lm_damping_update(1.0, 2.0, -0.5) == (2.0, 4.0)
    assert lm_damping_update(1.0, 2.0, 0.9)[0] < 1.0
    model = ResidualModel(rosen_residual, [-1.2, 1.0])
    x = model.x
    # an (almost) undamped, exactly solved GN step overshoots here
    opt = GaussNewton(model, damping=1e-10, solver="dense")
    closure = least_squares_closure(opt, model)

    dampings = []
    for _ in range(3):
        before = opt.state[x].get("damping", 1e-10)
        rejected = opt.state[x].get("n_rejected", 0)
        opt.step(closure)
        if opt.state[x]["n_rejected"] > rejected:
            dampings.append((before, opt.state[x]["damping"]))
    assert dampings, "expected at least one rejected step"
    assert all(after > before for before, after in dampings)
    # consecutive rejections raise it ever faster (nu doubles)
    ratios = [a / b for b, a in dampings]
    assert ratios == sorted(ratios)


@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_gauss_newton_matches_minimize(solver):
    model = ResidualModel(rosen_residual, [-1.2, 1.0])
    x = model.x
    opt = GaussNewton(model, solver=solver, gtol=1e-9)
    closure = least_squares_closure(opt, model)

    while opt.stop_reason is None:
        opt.step(closure)
    res = minimize(
        rosen_residual,
        torch.tensor([-1.2, 1.0], dtype=DT),
        method="lm",
        gtol=1e-9,
        options=dict(solver=solver, damping_rule="nielsen"),  # GaussNewton's rule
    )
    assert res.converged and opt.converged
    torch.testing.assert_close(res.x, x.detach(), **EXACT)
    torch.testing.assert_close(res.x, torch.ones(2, dtype=DT), rtol=0, atol=SOLUTION_TOL)
    assert res.matvecs == opt.state[x]["matvecs"]


def test_gauss_newton_closure_must_return_pair():
    x = torch.ones(2, dtype=DT, requires_grad=True)
    opt = GaussNewton([x])
    with pytest.raises(TypeError, match="loss, output"):
        opt.step(contract(opt, lambda: (x * x).sum()))
