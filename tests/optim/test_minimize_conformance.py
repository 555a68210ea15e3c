"""scipy.optimize's Newton-type test problems through ``second.minimize``, with defaults.

Rosenbrock at several sizes and starts, Himmelblau from next to its local maximum, the
maximum-entropy problem whose Hessian is singular, and x^2 y^2 + x^4 + 1 (a degenerate
minimum). Each must converge to a stationary point with the default settings, and no
result may claim success at a NaN objective.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from second import minimize

F = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 0, 0]], dtype=torch.float64)
K = torch.tensor([1.0, 0.3, 0.5], dtype=torch.float64)


def rosen(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def himmelblau(x):
    return (x[0] ** 2 + x[1] - 11) ** 2 + (x[0] + x[1] ** 2 - 7) ** 2


def entropy(x):  # maximum entropy: log Z(x) - K x; shifting x[0] changes nothing
    return torch.logsumexp(F @ x, 0) - K @ x


def degenerate(x):
    return x[0] ** 2 * x[1] ** 2 + x[0] ** 4 + 1


def start(n):
    x = torch.zeros(n, dtype=torch.float64)
    x[::2], x[1::2] = -1.2, 1.0
    return x


PROBLEMS = {
    "rosen-2": (rosen, start(2)),
    "rosen-2-origin": (rosen, torch.zeros(2, dtype=torch.float64)),
    "rosen-10": (rosen, start(10)),
    "rosen-100": (rosen, start(100)),
    "himmelblau": (himmelblau, torch.tensor([-0.27, -0.9], dtype=torch.float64)),
    "entropy": (entropy, torch.zeros(3, dtype=torch.float64)),
    "x2y2+x4+1": (degenerate, torch.tensor([1.0, 1.0], dtype=torch.float64)),
}
TOL = 1e-8


def check(res, fun, tol=TOL):
    assert res.converged, res.message
    assert math.isfinite(res.fun)
    x = res.x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fun(x), x)
    assert float(g.norm()) <= tol  # the stationarity it claims, recomputed


@pytest.mark.parametrize("method", ["newton-cg", "newton-exact"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_converges_with_defaults(name, method):
    fun, x0 = PROBLEMS[name]
    res = minimize(fun, x0, method=method, gtol=TOL)
    check(res, fun)
    if name == "entropy":  # SciPy's reference solution; x[0] is free (singular Hessian)
        ref = torch.tensor([0.0, -0.524869316, 0.487525860], dtype=torch.float64)
        assert torch.allclose(res.x[1:], ref[1:], atol=1e-6)
        assert math.isclose(res.fun, float(entropy(ref)), rel_tol=1e-10)
    if name.startswith("rosen-2"):
        assert torch.allclose(res.x, torch.ones(2, dtype=torch.float64), atol=1e-6)
    if name == "himmelblau":  # one of the four minima, f = 0
        assert res.fun < 1e-12


@pytest.mark.slow
def test_rosenbrock_1000_with_defaults():
    res = minimize(rosen, start(1000), gtol=TOL)
    check(res, rosen)


@pytest.mark.parametrize("method", ["newton-cg", "newton-exact"])
def test_nan_objective_is_never_success(method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = minimize(
            lambda x: (x * 0).sum() + float("nan"),
            torch.zeros(3, dtype=torch.float64),
            method=method,
        )
    assert not res.converged and "not finite" in res.message


def test_iteration_limit_scales_and_says_how_far_it_got():
    res = minimize(rosen, start(100), maxiter=5)
    assert not res.converged
    assert "iteration limit (5)" in res.message and "fell from" in res.message
    res = minimize(rosen, start(2), maxiter=0)
    assert res.nit == 0 and not res.converged and "limit (0)" in res.message
    with pytest.raises(ValueError, match="maxiter"):
        minimize(rosen, start(2), maxiter=-1)
