"""second.minimize (optim/_minimize.py)."""

from __future__ import annotations

import math

import pytest
import torch

import second
from newton_cases import DT, SOLUTION_TOL, quadratic_problem, rosen
from second._errors import SecondDeprecationWarning
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


def test_tol_is_the_deprecated_spelling_of_gtol():
    x0 = torch.tensor([-1.2, 1.0], dtype=DT)
    new = minimize(rosen, x0, method="newton-cg", gtol=1e-3)
    match = r"minimize\(tol=\.\.\.\) is deprecated and stops working in 0\.3: use gtol="
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        old = minimize(rosen, x0, method="newton-cg", tol=1e-3)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert old.converged and old.grad_norm > 1e-6  # stopped at 1e-3, not the default 1e-6
    assert old.nit == new.nit and torch.equal(old.x, new.x)
    with pytest.raises(ValueError, match="pass gtol only"):
        with pytest.warns(SecondDeprecationWarning, match=match):
            minimize(rosen, x0, tol=1e-3, gtol=1e-4)


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


# -- method="auto" returns the better of its two parts ------------------------------------


def rosen_nd(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def rosen_start(n):
    x = torch.full((n,), -1.2, dtype=DT)
    x[1::2] = 1.0
    return x


@pytest.mark.parametrize("maxiter", [37, 40])
def test_auto_never_returns_worse_than_its_newton_cg_part(maxiter):
    """Dense Newton restarted from x0 under the iteration limit ended at f = 174.8 (maxiter
    37) and 9.7 (40), above the f = 5.84 Newton-CG had reached; that point was thrown away."""
    res = minimize(rosen_nd, rosen_start(10), maxiter=maxiter)
    assert res.method == "newton-cg, then newton-exact" and not res.converged
    best_cg = min(h["loss"] for h in res.history if h["method"] == "newton-cg")
    best_dense = min(h["loss"] for h in res.history if h["method"] == "newton-exact")
    assert best_cg < best_dense  # the case in point: the dense part ended higher
    assert res.fun == best_cg and res.fun == float(rosen_nd(res.x))
    assert "the result is Newton-CG's last point" in res.message
    assert res.status == "maxiter" and res.nit == maxiter  # both parts' iterations count
    assert res.nfev == res.history[-1]["nfev"] and res.matvecs == res.history[-1]["matvecs"]


def test_auto_returns_the_dense_result_when_it_converges():
    res = minimize(rosen_nd, rosen_start(10), gtol=1e-8)
    assert res.converged and res.method == "newton-cg, then newton-exact"
    assert "Newton-CG's last point" not in res.message


# -- maxiter=0: the method's own evaluation at x0 -------------------------------------------


def test_maxiter_0_evaluates_the_lm_objective():
    """A one-residual vector was taken as the objective itself (fun = -3 instead of 4.5)."""
    res = minimize(lambda x: x - 3.0, torch.zeros(1, dtype=DT), method="lm", maxiter=0)
    one = minimize(lambda x: x - 3.0, torch.zeros(1, dtype=DT), method="lm", maxiter=1)
    assert res.fun == one.history[0]["loss"] == 4.5
    assert res.grad_norm == one.history[0]["grad_norm"] == 3.0
    assert (res.nit, res.nfev, res.ngev, res.matvecs) == (0, 1, 1, 0)
    assert res.status == "maxiter" and res.method == "gauss-newton"
    assert "limit (0)" in res.message and "fell" not in res.message


@pytest.mark.parametrize("method", ["auto", "newton-cg", "newton-exact", "lm"])
def test_maxiter_0_reports_a_nan_objective_as_nonfinite(method):
    fun = (lambda x: x * float("nan")) if method == "lm" else (lambda x: (x * float("nan")).sum())
    res = minimize(fun, torch.zeros(2, dtype=DT), method=method, maxiter=0)
    assert res.status == "nonfinite" and not res.converged


@pytest.mark.parametrize("method", ["auto", "newton-cg", "newton-exact"])
def test_maxiter_0_refuses_what_the_method_refuses(method):
    with pytest.raises(ValueError, match="scalar"):
        minimize(lambda x: x - 3.0, torch.zeros(2, dtype=DT), method=method, maxiter=0)
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        minimize(
            lambda x: (x.detach() ** 2).sum(), torch.zeros(2, dtype=DT), method=method, maxiter=0
        )


def test_maxiter_0_at_a_minimizer_converges_and_auto_names_the_same_method():
    res = minimize(lambda x: ((x - 1) ** 2).sum(), torch.ones(2, dtype=DT), maxiter=0)
    assert res.converged and res.nit == 0
    ran = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT), maxiter=0)
    assert ran.method == minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT), maxiter=1).method


# -- options out of range -----------------------------------------------------------------

BAD_OPTIONS = [
    ("newton-cg", dict(max_time=float("nan")), "max_time"),
    ("newton-cg", dict(max_time=-1.0), "max_time"),
    ("newton-cg", dict(options=dict(cg_maxiter=0)), "cg_maxiter"),
    ("newton-cg", dict(options=dict(eta=2.0)), "eta"),
    ("newton-exact", dict(options=dict(eta=0.0)), "eta"),
    ("newton-cg", dict(options=dict(forcing=5.0)), "forcing"),
    ("newton-cg", dict(options=dict(forcing="fixed")), "forcing"),
    ("newton-cg", dict(options=dict(xtol=-1.0)), "xtol"),
    ("newton-cg", dict(options=dict(initial_radius=-1.0)), "initial_radius"),
    ("newton-exact", dict(options=dict(initial_radius=0.0)), "initial_radius"),
    ("newton-cg", dict(options=dict(max_radius=0.0)), "max_radius"),
    ("newton-cg", dict(options=dict(memory=-1)), "memory"),
    ("newton-cg", dict(options=dict(unbounded_window=0)), "unbounded_window"),
    ("newton-exact", dict(options=dict(reuse_tol=-1.0)), "reuse_tol"),
    ("lm", dict(options=dict(damping=-1.0, damping_rule="nielsen")), "damping"),
    ("lm", dict(options=dict(min_damping=1.0, max_damping=0.5)), "min_damping"),
]


@pytest.mark.parametrize("method,kwargs,name", BAD_OPTIONS, ids=[b[2] for b in BAD_OPTIONS])
def test_options_out_of_range_raise(method, kwargs, name):
    """They failed silently (max_time NaN ignored, cg_maxiter=0 the default) or late, with a
    message about something else (eta=2: every step rejected until maxiter)."""
    fun = (lambda x: x - 1.0) if method == "lm" else rosen
    with pytest.raises(ValueError, match=name):
        minimize(fun, torch.zeros(2, dtype=DT), method=method, **kwargs)


def test_options_in_range_are_accepted():
    res = minimize(
        rosen,
        torch.tensor([-1.2, 1.0], dtype=DT),
        method="newton-cg",
        max_time=60.0,
        options=dict(cg_maxiter=5, eta=0.2, forcing=0.1, xtol=0.0, max_radius=math.inf),
    )
    assert res.converged


def _rosen_chain(x):
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@pytest.mark.parametrize("method", ["newton-cg", "newton-exact", "gauss-newton"])
def test_an_acceptance_threshold_above_a_quarter_still_converges(method):
    # a rejected step with 1/4 < rho <= eta left the radius (Moré's damping) as it was: the
    # same step was tried again until maxiter
    fun = _rosen_chain
    if method == "gauss-newton":
        fun = lambda x: torch.cat([10 * (x[1:] - x[:-1] ** 2), 1 - x[:-1]])  # noqa: E731
    x0 = torch.full((8,), -1.0, dtype=DT)
    for eta in (0.5, 0.9):
        res = minimize(fun, x0, method=method, options=dict(eta=eta), maxiter=300)
        assert res.converged, (eta, res.message)


def test_the_line_search_reports_the_objective_itself():
    # below f's rounding the search compares values by the trapezoidal rule; that estimate
    # was carried as f, into the history and the result (here below the true minimum 1e8)
    def f(x):
        return 1e8 + ((x - 1) ** 4).sum()

    res = minimize(f, torch.zeros(4, dtype=DT), method="newton-cg",
                   options=dict(globalization="line-search"), gtol=1e-12)  # fmt: skip
    assert res.fun == float(f(res.x)) and res.fun >= 1e8
    assert all(h["loss"] >= 1e8 for h in res.history)


def test_a_hessian_that_is_not_finite_ends_dense_newton_as_nonfinite():
    # |x|^1.5 has no second derivative at 0: the dense Hessian holds NaN (it raised on a
    # NaN trust radius)
    def f(x):
        return (x**2).sum() + (x.abs() ** 1.5).sum()

    for method in ("newton-exact", "newton-cg"):
        res = minimize(f, torch.tensor([0.0, 1.0], dtype=DT), method=method)
        assert res.status == "nonfinite" and not res.converged
        assert "not finite" in res.message


@pytest.mark.parametrize("options", [None, dict(globalization="line-search")])
def test_a_float32_run_stuck_at_its_rounding_stops_as_stalled(options):
    # the default xtol (1e-14) is below float32's resolution: x stopped moving but the run
    # spun to maxiter; the default is now 2 eps of x0's dtype
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(2000, 10, generator=g), torch.randint(0, 2, (2000,), generator=g)

    def f(w):
        z = X @ w
        return torch.nn.functional.binary_cross_entropy_with_logits(
            z, y.float(), reduction="sum"
        ) + 0.5 * (w @ w)

    res = minimize(f, torch.zeros(10), method="newton-cg", options=options, maxiter=500)
    assert res.converged or res.status == "stalled", res.message
    assert res.nit < 100 and res.x.dtype == torch.float32


@pytest.mark.parametrize("memory", [0, -1])
def test_memory_below_one_is_refused_with_the_rule_that_holds(memory):
    # -1 was refused with "memory must be an integer >= 0" and 0 with ">= 1"
    with pytest.raises(ValueError, match=r"memory must be an integer >= 1"):
        minimize(lambda x: (x**2).sum(), torch.ones(3, dtype=DT), method="newton-cg",
                 options=dict(memory=memory))  # fmt: skip
