"""Gauss-Newton / Levenberg-Marquardt in residual form (second.newton.gauss_newton).

References: the closed-form zero-residual solution, and dense float64 Newton
(second.newton.newton_dense on 0.5 ||r||^2) for the small- and large-residual problems.
"""

from __future__ import annotations

import pytest
import torch

from second import minimize
from second.newton import Criteria, gauss_newton, newton_dense

DT = torch.float64
SOLUTION_TOL = 1e-7  # gtol 1e-10 on well-conditioned 2-3 parameter problems
T = torch.linspace(0, 2, 30, dtype=DT)
NOISE = 0.05 * torch.sin(17 * T)  # a fixed, deterministic "noise"


def exp_fit(y):
    return lambda x: x[0] * torch.exp(-x[1] * T) + x[2] - y


Y0 = 2.0 * torch.exp(-1.5 * T) + 0.5  # zero residual at (2, 1.5, 0.5)


def freudenstein_roth(x):
    """MGH problem 2: a large-residual local minimizer (f = 24.49) from (0.5, -2)."""
    return torch.stack(
        [
            -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
            -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
        ]
    )


def reference(fun, x0):
    res = newton_dense(lambda x: 0.5 * (fun(x) ** 2).sum(), x0, Criteria(gtol=1e-9, maxiter=500))
    assert res.converged
    return res.x


RULES = ["more", "nielsen"]
SOLVERS = ["dense", "cg"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_zero_residual_converges_fast_to_the_exact_parameters(rule, solver):
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=DT)
    res = gauss_newton(
        exp_fit(Y0), x0, Criteria(gtol=1e-10, maxiter=100), damping_rule=rule, solver=solver
    )
    assert res.converged and res.status == "converged" and res.method == "gauss-newton"
    torch.testing.assert_close(
        res.x, torch.tensor([2.0, 1.5, 0.5], dtype=DT), atol=SOLUTION_TOL, rtol=0
    )
    assert res.nit <= 30 and res.matvecs > 0 and res.fun < 1e-18
    # quadratic convergence at the end: the gradient norm falls by orders of magnitude per step
    g = [h["grad_norm"] for h in res.history]
    assert g[-1] < 1e-3 * g[-2] or g[-2] < 1e-6


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("solver", SOLVERS)
def test_small_residual_matches_dense_newton(rule, solver):
    fun, x0 = exp_fit(Y0 + NOISE), torch.tensor([1.0, 1.0, 0.0], dtype=DT)
    res = gauss_newton(fun, x0, Criteria(gtol=1e-10, maxiter=200), damping_rule=rule, solver=solver)
    assert res.converged
    torch.testing.assert_close(res.x, reference(fun, x0), atol=SOLUTION_TOL, rtol=0)
    assert res.fun > 1e-3  # the residual is not zero


@pytest.mark.parametrize("rule", RULES)
def test_large_residual_converges_to_the_local_minimizer(rule):
    x0 = torch.tensor([0.5, -2.0], dtype=DT)
    res = gauss_newton(freudenstein_roth, x0, Criteria(gtol=1e-8, maxiter=500), damping_rule=rule)
    assert res.converged, res.message
    torch.testing.assert_close(res.x, reference(freudenstein_roth, x0), atol=1e-6, rtol=0)
    assert abs(res.fun - 24.4921268) < 1e-5  # MGH: f = 48.9842 for sum r^2


def test_loss_output_pair_form_and_minimize_lm():
    fun = exp_fit(Y0 + NOISE)
    x0 = torch.tensor([1.0, 1.0, 0.0], dtype=DT)

    def pair(x):
        out = x[0] * torch.exp(-x[1] * T) + x[2]
        return 0.5 * ((out - (Y0 + NOISE)) ** 2).sum(), out

    a = minimize(fun, x0, method="lm", gtol=1e-10)
    b = minimize(pair, x0, method="gauss-newton", gtol=1e-10)
    assert a.converged and b.converged
    torch.testing.assert_close(a.x, b.x, atol=SOLUTION_TOL, rtol=0)


def test_a_rejected_step_shrinks_the_radius():
    """A tiny problem whose first full Gauss-Newton step overshoots: More's region shrinks."""
    x0 = torch.tensor([0.5, -2.0], dtype=DT)
    res = gauss_newton(freudenstein_roth, x0, Criteria(gtol=1e-8, maxiter=500), initial_radius=1e6)
    radii = [h["radius"] for h in res.history]
    assert res.converged and min(radii) < 1e6  # rejected at least once, then recovered


def test_bad_input_raises():
    x0 = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="residual vector"):
        gauss_newton(lambda x: (x**2).sum(), x0, Criteria(gtol=1e-8, maxiter=5))
    with pytest.raises(ValueError, match="damping_rule"):
        gauss_newton(lambda x: x, x0, Criteria(gtol=1e-8, maxiter=5), damping_rule="x")
    with pytest.raises(ValueError, match="solver"):
        gauss_newton(lambda x: x, x0, Criteria(gtol=1e-8, maxiter=5), solver="x")
    with pytest.raises(ValueError, match="unknown options"):
        minimize(lambda x: x, x0, method="lm", options=dict(cg_max_iter=3))


@pytest.mark.parametrize(
    "fun",
    [
        lambda x: x.detach() - 1.0,  # a residual with no graph to x
        lambda x: (((x.detach() - 1.0) ** 2).sum(), x.detach() - 1.0),  # a detached pair
    ],
    ids=["residual", "pair"],
)
def test_a_residual_without_a_graph_raises(fun):
    """It was reported converged at x0 (the missing gradient was taken as zero)."""
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        minimize(fun, torch.zeros(3, dtype=DT), method="lm")


def test_a_pair_whose_loss_does_not_use_its_output_raises():
    def pair(x):
        out = torch.tanh(x)
        return ((torch.tanh(x) - 0.5) ** 2).sum(), out  # the loss of another copy of out

    with pytest.raises(ValueError, match="does not use the output"):
        minimize(pair, torch.zeros(3, dtype=DT), method="lm")


def test_a_residual_that_ignores_a_coordinate_converges():
    res = minimize(lambda x: x[:2] - 1.0, torch.zeros(3, dtype=DT), method="lm", gtol=1e-10)
    assert res.converged
    torch.testing.assert_close(
        res.x, torch.tensor([1.0, 1.0, 0.0], dtype=DT), rtol=0, atol=SOLUTION_TOL
    )
