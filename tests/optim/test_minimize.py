"""second.minimize (optim/_minimize.py)."""

from __future__ import annotations

import pytest
import torch

import second
from newton_cases import DT, SOLUTION_TOL, quadratic_problem, rosen
from second.optim import (
    NewtonCG,
    minimize,
)


@pytest.mark.parametrize("method", ["newton-cg", "newton-exact", "dense"])
def test_minimize_rosenbrock(method):
    res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT), method=method, gtol=1e-9)
    assert res.converged and res.message.startswith("converged")
    torch.testing.assert_close(res.x, torch.ones(2, dtype=DT), rtol=0, atol=SOLUTION_TOL)
    assert res.grad_norm <= 1e-9 and res.fun < 1e-15
    assert res.nit > 0 and res.nfev > 0 and res.matvecs > 0
    assert res.cost == res.ngev + 2 * res.matvecs


def test_minimize_newton_exact_one_step_on_a_quadratic():
    A, b, x_star, f = quadratic_problem(n=5)
    res = minimize(
        f,
        torch.zeros(5, dtype=DT),
        method="newton-exact",
        gtol=1e-9,
        options=dict(initial_radius=1e3),
    )
    assert res.converged and res.nit == 1
    torch.testing.assert_close(res.x, x_star, rtol=0, atol=SOLUTION_TOL)


def test_minimize_lm_with_loss_output_pair():
    target = torch.tensor([0.5, -1.0, 1.5], dtype=DT)

    def fun(x):
        out = torch.tanh(x)
        return ((out - torch.tanh(target)) ** 2).sum(), out

    res = minimize(fun, torch.zeros(3, dtype=DT), method="gauss-newton", gtol=1e-10)
    assert res.converged
    torch.testing.assert_close(res.x, target, rtol=0, atol=1e-7)


def test_minimize_reports_failure_honestly():
    res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT), maxiter=3)
    assert not res.converged and "iteration limit (3)" in res.message
    assert res.nit == 3


def test_minimize_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        minimize(rosen, torch.zeros(2, dtype=DT), method="bfgs")
    with pytest.raises(ValueError, match="scalar"):
        minimize(lambda x: x * 2, torch.zeros(2, dtype=DT), method="newton-cg")
    with pytest.raises(ValueError, match="residual"):
        minimize(lambda x: (x * x).sum(), torch.zeros(2, dtype=DT), method="lm")
    with pytest.raises(ValueError):
        minimize(rosen, torch.zeros(2, dtype=DT), gtol=-1.0)


def test_minimize_is_exported():
    assert second.minimize is minimize
    assert second.optim.NewtonCG is NewtonCG


def test_minimize_newton_exact_lazy_hessian():
    x0 = torch.tensor([-1.2, 1.0], dtype=DT)
    fresh = minimize(rosen, x0, method="newton-exact", gtol=1e-9)
    lazy = minimize(rosen, x0, method="newton-exact", gtol=1e-9, options=dict(hessian_every=5))
    assert lazy.converged
    torch.testing.assert_close(lazy.x, torch.ones(2, dtype=DT), rtol=0, atol=SOLUTION_TOL)
    assert lazy.matvecs < fresh.matvecs
    with pytest.raises(ValueError):
        minimize(rosen, x0, method="newton-exact", options=dict(hessian_every=0))
