"""second.optim.NewtonCG (optim/newton.py): trust-region Newton-CG on the core."""

from __future__ import annotations

import math

import torch

from newton_cases import DT, SOLUTION_TOL, contract, quadratic_problem, rosen
from second.optim import (
    NewtonCG,
    minimize,
)


def test_newton_cg_one_step_on_a_quadratic():
    A, b, x_star, f = quadratic_problem(n=6)
    x = torch.zeros(6, dtype=DT, requires_grad=True)
    opt = NewtonCG([x], initial_radius=1e3, cg_tol=1e-12, gtol=1e-9)
    opt.step(contract(opt, lambda: f(x)))
    assert torch.allclose(x.detach(), x_star, atol=SOLUTION_TOL, rtol=0)
    st = opt.state[x]
    assert st["n_iter"] == 1 and st["matvecs"] <= 6  # at most n CG steps
    opt.step(contract(opt, lambda: f(x)))
    assert opt.converged and "converged" in opt.stop_reason


def test_newton_cg_rosenbrock_and_counters():
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], maxiter=200, gtol=1e-10)
    opt.step(contract(opt, lambda: rosen(x)))
    assert opt.converged
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=DT), rtol=0, atol=SOLUTION_TOL)
    st = opt.state[x]
    assert st["nfev"] == st["n_iter"] + 1  # one trial per iteration, plus the start
    assert st["ngev"] == st["n_iter"] - st.get("n_rejected", 0) + 1
    hist = opt.history
    assert all(h2["matvecs"] >= h1["matvecs"] for h1, h2 in zip(hist, hist[1:]))
    assert hist[-1]["grad_norm"] <= 1e-10


def test_newton_cg_rejected_step_costs_no_hvp():
    x = torch.tensor([3.0], dtype=DT, requires_grad=True)

    def f():  # convex, but the Newton step from 3 lands at -27: far too long
        return (torch.sqrt(1 + x * x) - 1).sum()

    opt = NewtonCG([x], initial_radius=100.0, cg_tol=1e-12)
    step = contract(opt, f)  # one closure object: the optimizer reuses its evaluations
    opt.step(step)
    st = opt.state[x]
    assert st["n_rejected"] == 1 and st["radius"] < 100.0 and st["matvecs"] == 1
    assert float(x.detach()) == 3.0  # a rejected step leaves the parameters where they were
    opt.step(step)  # re-solved from the stored CG path: no new product
    assert st["n_rejected"] == 2 and st["matvecs"] == 1
    opt.step(step)
    assert st["n_rejected"] == 2 and float(f().detach()) < math.sqrt(10.0) - 1


def test_newton_cg_with_preconditioner_converges():
    A, b, x_star, f = quadratic_problem(n=6)
    Ainv = torch.linalg.inv(A)
    x = torch.zeros(6, dtype=DT, requires_grad=True)
    opt = NewtonCG([x], initial_radius=1e3, cg_tol=1e-12, preconditioner=lambda r: Ainv @ r)
    opt.step(contract(opt, lambda: f(x)))
    assert opt.state[x]["matvecs"] == 1
    torch.testing.assert_close(x.detach(), x_star, rtol=0, atol=SOLUTION_TOL)


def test_newton_cg_and_minimize_reach_the_same_minimizer():
    # NewtonCG (the optimizer) and minimize(method="newton-cg") (the Newton core, with
    # Eisenstat-Walker forcing and an L-BFGS preconditioner) follow different paths; both
    # must reach the minimizer, and the core's counters must be consistent
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], gtol=1e-8)

    closure = contract(opt, lambda: rosen(x))

    while opt.stop_reason is None:
        opt.step(closure)  # the same closure object: each call reuses the last evaluation
    res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT), method="newton-cg", gtol=1e-8)
    assert res.converged and res.method == "newton-cg" and res.status == "converged"
    assert opt.converged
    torch.testing.assert_close(res.x, x.detach(), atol=1e-7, rtol=0)
    torch.testing.assert_close(res.x, torch.ones(2, dtype=DT), atol=1e-7, rtol=0)
    # one evaluation per trial point, a gradient only at accepted ones, products inside CG
    assert res.nfev == res.nit + 1 and res.ngev <= res.nfev and res.matvecs > 0
    assert len(res.history) == sum(1 for h in res.history) and res.history[-1]["grad_norm"] <= 1e-8


def test_newton_cg_external_parameter_change_resets_the_cache():
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], maxiter=100, gtol=1e-9)
    opt.step(contract(opt, lambda: rosen(x)))
    assert opt.converged
    with torch.no_grad():
        x.add_(0.3)
    opt.step(contract(opt, lambda: rosen(x)))
    assert opt.converged
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=DT), rtol=0, atol=1e-7)


def test_newton_cg_extrapolation_helps_in_a_flattening_valley():
    def run(extrapolation):
        x = torch.tensor([-3.0], dtype=DT, requires_grad=True)
        opt = NewtonCG([x], extrapolation=extrapolation, initial_radius=100.0, gtol=1e-9)

        def f():  # the model under-predicts the decrease while exp(-x) dominates
            return (torch.exp(-x) + 1e-4 * x * x).sum()

        step = contract(opt, f)
        while opt.stop_reason is None:
            opt.step(step)
        return opt, x.detach()

    plain, x_plain = run(0)
    extra, x_extra = run(5)
    assert plain.converged and extra.converged
    torch.testing.assert_close(x_extra, x_plain, rtol=0, atol=1e-6)
    assert extra.state[next(iter(extra.state))]["n_extrapolated"] >= 1
    assert extra.history[-1]["ngev"] < plain.history[-1]["ngev"]
