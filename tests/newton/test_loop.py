"""Newton core loops: dense float64 references, each safeguard, result fields."""

from __future__ import annotations

import math

import pytest
import torch

from second import minimize
from second.newton import Criteria, newton_cg, newton_dense

DT = torch.float64


def ill_quadratic(n=40, cond=1e8, seed=0):
    # eigenvalues 1/cond ... 1: ||A|| = 1 keeps the gradient's rounding floor near 1e-16
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.logspace(-math.log10(cond), 0, n, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    b = A @ torch.ones(n, dtype=DT)
    return A, b, (lambda x: 0.5 * x @ A @ x - b @ x)


@pytest.mark.parametrize("globalization", ["trust-region", "line-search"])
def test_newton_cg_on_a_condition_1e8_quadratic(globalization):
    A, b, f = ill_quadratic()
    res = newton_cg(
        f,
        torch.zeros(40, dtype=DT),
        Criteria(gtol=1e-8, maxiter=200),
        globalization=globalization,
        initial_radius=100.0,
    )
    assert res.converged and res.status == "converged", res.message
    assert res.grad_norm <= 1e-8
    # the gradient it claims, recomputed against the dense matrix, and the optimality gap it
    # implies: f(x) - f* = r^T A^{-1} r / 2 <= ||r||^2 / (2 lambda_min)
    r = A @ res.x - b
    assert float(r.norm()) <= 1e-8
    x_star = torch.linalg.solve(A, b)
    assert f(res.x) - f(x_star) <= 0.5 * float(r.norm()) ** 2 * 1e8 + 1e-12
    assert res.matvecs > 0 and res.ngev >= res.nit and res.history[-1]["grad_norm"] <= 1e-8


def test_newton_dense_one_step_on_a_quadratic_equals_the_newton_step():
    A, b, f = ill_quadratic(n=6, cond=1e3)
    res = newton_dense(
        f, torch.zeros(6, dtype=DT), Criteria(gtol=1e-9, maxiter=1), initial_radius=1e6
    )
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-9)
    assert res.matvecs == 6


def test_newton_dense_forms_a_quadratics_hessian_once():
    # the Hessian predicts every change of a quadratic's gradient: formed once, then reused
    # through the radius-limited steps and the final Newton step (reuse_tol=0: each time)
    A, b, f = ill_quadratic(n=12, cond=1e6)
    crit = Criteria(gtol=1e-9, maxiter=100)
    lazy = newton_dense(f, torch.zeros(12, dtype=DT), crit, initial_radius=0.1)
    every = newton_dense(f, torch.zeros(12, dtype=DT), crit, initial_radius=0.1, reuse_tol=0.0)
    assert lazy.converged and every.converged
    assert lazy.nit == every.nit > 2  # the same steps: the Hessian is exact either way
    assert lazy.matvecs == 12 and every.matvecs == 12 * (every.ngev - 1)
    torch.testing.assert_close(lazy.x, torch.linalg.solve(A, b), rtol=1e-6, atol=1e-6)


def test_newton_dense_reforms_a_hessian_that_stops_predicting_the_gradient():
    # Rosenbrock: far from the solution the gradient's change is poorly predicted (the
    # Hessian is formed again), near it well (reused): between one and ngev Hessians
    def rosen(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    crit = Criteria(gtol=1e-10, maxiter=500)
    x0 = torch.tensor([-1.2, 1.0], dtype=DT)
    lazy = newton_dense(rosen, x0, crit)
    every = newton_dense(rosen, x0, crit, reuse_tol=0.0)
    assert lazy.converged and every.converged
    torch.testing.assert_close(lazy.x, torch.ones(2, dtype=DT), rtol=0, atol=1e-8)
    hessians, every_h = lazy.matvecs // 2, every.matvecs // 2
    assert 1 < hessians < every_h <= every.ngev
    # a Hessian reused for a step whose gradient it predicted to within 1e-2 of its change
    assert lazy.ngev <= every.ngev + 3


def test_newton_dense_forms_the_hessian_again_before_it_calls_a_stall():
    # a kink in the curvature (20x to its left) near x = 1e6, where xtol (1 + |x|) is ~1e-8:
    # the reused Hessian's step is rejected and its radius would fall below xtol; the Hessian
    # is formed at the point instead, in the same region, and the run converges
    c = 1e6
    tiny = 1e-14 * (1 + c)
    right, left = 1.0e6, 2.0e7
    slope = 3 * right * tiny

    def f(x):
        u = x[0] - c
        return slope * u + 0.5 * torch.where(u > 0, right, left) * u * u

    x0 = torch.tensor([c + 300 * tiny], dtype=DT)
    crit = Criteria(gtol=0.5 * right * tiny, maxiter=50)
    res = newton_dense(f, x0, crit, initial_radius=300.1 * tiny)
    assert res.converged, res.message
    assert res.matvecs == 2  # formed at x0, reused once, rejected, formed again


def test_rejected_trust_region_step_shrinks_the_radius_without_products():
    def rosen(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    res = newton_cg(
        rosen,
        torch.tensor([-1.2, 1.0], dtype=DT),
        Criteria(gtol=1e-10, maxiter=500),
        initial_radius=50.0,
    )
    assert res.converged
    radii = [h["radius"] for h in res.history]
    assert any(b < a for a, b in zip(radii, radii[1:]))  # some step was rejected
    assert res.nfev > res.ngev  # rejected trial points cost a value, no gradient
    torch.testing.assert_close(res.x, torch.ones(2, dtype=DT), rtol=0, atol=1e-8)


def test_negative_curvature_at_a_saddle_is_used():
    # f = x^2 - y^2 + y^4 / 4 from the saddle's neighbourhood: minima at y = +-sqrt(2)
    def f(z):
        return z[0] ** 2 - z[1] ** 2 + z[1] ** 4 / 4

    for glob in ("trust-region", "line-search"):
        res = newton_cg(
            f,
            torch.tensor([1.0, 1e-3], dtype=DT),
            Criteria(gtol=1e-10, maxiter=100),
            globalization=glob,
        )
        assert res.converged, (glob, res.message)
        assert abs(abs(float(res.x[1])) - math.sqrt(2)) < 1e-8 and res.fun < -0.99


def test_unbounded_objective_is_reported():
    # f = exp(-x) + exp(-y): the infimum 0 is not attained, iterates run off to infinity
    def f(x):
        return torch.exp(-x).sum()

    for method in ("newton-cg", "newton-exact"):
        res = minimize(f, torch.zeros(2, dtype=DT), method=method, gtol=0.0, maxiter=500)
        assert res.status == "unbounded" and not res.converged, res.message
        assert "unbounded" in res.message and res.nit < 100
        assert float(res.x.norm()) > 10 * 1.0


def test_unbounded_criterion_does_not_fire_on_a_converging_run():
    A, b, f = ill_quadratic(n=20, cond=1e8)
    x0 = torch.zeros(20, dtype=DT)
    res = minimize(lambda x: f(x / 1e3), x0, method="newton-cg", gtol=1e-12, maxiter=400)
    assert res.status != "unbounded", res.message


def test_line_search_failure_is_reported():
    # a gradient that lies (points uphill of the value): no step length decreases f
    class Liar(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x * x).sum()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return -2 * g * x

    res = newton_cg(
        Liar.apply,
        torch.ones(3, dtype=DT),
        Criteria(gtol=1e-10, maxiter=20),
        globalization="line-search",
    )
    assert res.status == "line_search" and not res.converged
    assert "line search failed" in res.message
    torch.testing.assert_close(res.x, torch.ones(3, dtype=DT))  # never moved


def test_nan_objective_is_never_converged():
    res = newton_cg(
        lambda x: (x * x).sum() * float("nan"),
        torch.ones(2, dtype=DT),
        Criteria(gtol=1.0, maxiter=5),
    )
    assert res.status == "nonfinite" and not res.converged


def test_auto_names_the_method_and_deprecated_fields_warn():
    f = lambda x: ((x - 2) ** 2).sum()  # noqa: E731
    small = minimize(f, torch.zeros(3, dtype=DT))
    assert small.method == "newton-cg" and small.converged  # CG is cheap here: no switch
    big = minimize(f, torch.zeros(500, dtype=DT))
    assert big.method == "newton-cg" and big.converged
    with pytest.warns(DeprecationWarning, match="converged"):
        assert small.success
    with pytest.warns(DeprecationWarning, match="matvecs"):
        assert small.nhvp == small.matvecs
    with pytest.warns(DeprecationWarning, match="gtol"):
        minimize(f, torch.zeros(3, dtype=DT), tol=1e-8)


def test_dense_hessian_in_chunks_equals_the_autograd_hessian():
    """n > 2 DENSE_CHUNK: the column chunks (three, the last one partial) are assembled in order."""
    from second.newton.loop import DENSE_CHUNK, dense_hessian

    n = 2 * DENSE_CHUNK + 14
    assert n > 2 * DENSE_CHUNK
    w = torch.randn(n, n, dtype=DT, generator=torch.Generator().manual_seed(0)) / n

    def f(x):
        return torch.tanh(w @ x).pow(2).sum() + (x**4).sum()

    x = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    H = dense_hessian(g, xr)
    torch.testing.assert_close(H, torch.autograd.functional.hessian(f, x), rtol=1e-12, atol=1e-12)
    # a linear function: no graph, a zero Hessian
    xl = x.clone().requires_grad_(True)
    (gl,) = torch.autograd.grad((xl * 2).sum(), xl, create_graph=True)
    assert not dense_hessian(gl, xl).any()


def test_newton_cg_stops_at_its_product_budget():
    A = torch.diag(torch.logspace(0, 8, 40, dtype=DT))
    f = lambda x: 0.5 * x @ A @ x - x.sum()  # noqa: E731
    res = newton_cg(f, torch.zeros(40, dtype=DT), Criteria(gtol=1e-8, maxiter=500), max_matvecs=15)
    assert res.status == "matvecs" and not res.converged and res.matvecs <= 15


def test_auto_switches_to_dense_newton_when_cg_is_costly():
    from second.optim._minimize import AUTO_SWITCH_MATVECS, AUTO_SWITCH_MIN

    n = 60
    A = torch.diag(torch.logspace(0, 8, n, dtype=DT))  # CG needs ~n products a direction
    f = lambda x: 0.5 * x @ A @ x - x.sum()  # noqa: E731
    res = minimize(f, torch.zeros(n, dtype=DT), gtol=1e-8)
    assert res.converged and res.method == "newton-cg, then newton-exact"
    torch.testing.assert_close(res.x, 1 / torch.diagonal(A), rtol=1e-6, atol=0)
    budget = max(AUTO_SWITCH_MIN, math.ceil(AUTO_SWITCH_MATVECS * n))
    assert res.matvecs >= budget + n  # the budget spent, then at least one dense Hessian
    iters = [h["n_iter"] for h in res.history]
    assert iters == sorted(iters) and res.nit == iters[-1]
    phases = [h["method"] for h in res.history]
    assert phases[0] == "newton-cg" and phases[-1] == "newton-exact"
    assert phases == sorted(phases, key=lambda m: m != "newton-cg")  # CG first, then dense
    cg = [h["matvecs"] for h in res.history if h["method"] == "newton-cg"]
    assert 0 < cg[-1] <= budget  # the matrix-free part stayed within its budget
    # well conditioned: CG needs a product or two a step, and auto stays matrix-free
    easy = minimize(lambda x: ((x - 2) ** 2).sum() + (x**4).sum(), torch.zeros(n, dtype=DT))
    assert easy.converged and easy.method == "newton-cg"


def test_auto_goes_on_from_a_nearly_converged_newton_cg_point():
    # 2-D Rosenbrock: Newton-CG spends its budget with ||grad|| ~1e-4 from ~2e2; dense
    # Newton finishes from there (restarting from x0 took 66 iterations instead of 41)
    def rosen(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    x0 = torch.tensor([-1.2, 1.0], dtype=DT)
    res = minimize(rosen, x0, gtol=1e-8)
    assert res.converged and res.method == "newton-cg, then newton-exact"
    assert "from Newton-CG's point" in res.message and res.nit <= 45
    # an iteration limit met in the dense part names the caller's limit, not the part's share
    short = minimize(rosen, x0, gtol=1e-14, maxiter=41)
    assert short.status == "maxiter" and "iteration limit (41)" in short.message


def test_noisy_differences_of_f_are_measured_by_the_gradients(monkeypatch):
    # an ill-conditioned f rounds far above its epsilon, so at small steps the change of f is
    # noise: where it disagrees with the quadratic model the trapezoidal rule on the two
    # gradients measures the reduction (exact for a quadratic)
    import second.newton.steps as steps

    A = torch.diag(torch.tensor([1.0, 1e8], dtype=DT))
    x, p = torch.tensor([1.0, 1e-4], dtype=DT), torch.tensor([-1e-9, -1e-13], dtype=DT)

    def f(z):
        return float(0.5 * z @ (A @ z)) + 1.0

    g, g_try = A @ x, A @ (x + p)
    pred = -float(g @ p + 0.5 * p @ (A @ p))  # the model is f itself: the true ratio is 1
    noisy = f(x + p) + 3 * pred  # the evaluation's rounding, three times the change
    assert pred < steps.NOISE * f(x)
    rho, measured, _ = steps._ratio(f(x), g, p, pred, noisy, lambda graph: (g_try, None))
    assert rho == pytest.approx(1.0, rel=1e-9) and measured is g_try
    monkeypatch.setattr(steps, "NOISE", steps.ROUNDING)  # the rounding threshold alone
    rho, measured, _ = steps._ratio(f(x), g, p, pred, noisy, lambda graph: (g_try, None))
    assert rho == pytest.approx(-2.0, rel=1e-6) and measured is None


def test_re_orthogonalized_cg_on_an_ill_conditioned_quadratic():
    # condition 1e8: re-orthogonalized CG (the default) needs well under half the products
    # of plain CG (57 against 159 here)
    n = 20
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, 8, n, dtype=DT)) @ Q.T
    A = 0.5 * (A + A.T)
    b = torch.randn(n, generator=g, dtype=DT)

    def run(reorthogonalize):
        return newton_cg(
            lambda x: 0.5 * x @ (A @ x) - b @ x,
            torch.zeros(n, dtype=DT),
            Criteria(1e-8, 500),
            reorthogonalize=reorthogonalize,
        )

    plain, default = run(False), run(True)
    assert plain.converged and default.converged and default.matvecs < 0.5 * plain.matvecs


def test_a_constant_offset_barely_changes_newton_cg():
    # a large |f| widens the noise band; where the change of f agrees with the model it is
    # still used (the trapezoidal rule everywhere in the band took 206 products instead of 130)
    def rosen(x):
        return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

    x0 = torch.full((10,), -1.2, dtype=DT)
    x0[1::2] = 1.0
    base = minimize(rosen, x0, method="newton-cg", gtol=1e-6)
    off = minimize(lambda x: rosen(x) + 1e8, x0, method="newton-cg", gtol=1e-6)
    assert base.converged and off.converged and off.matvecs <= 1.2 * base.matvecs


# -- dense Newton: a zero Hessian, and a stall -------------------------------------------

STALL_NIT = 20  # a stalled run must stop within a few iterations of reaching rounding
STALL_RTOL = 1e-12  # where it stalls: the solution to rounding (condition 1e4)


def test_newton_dense_on_a_linear_objective_reports_unbounded():
    """H = 0: exact_trust_region made a NaN step and the run raised about the radius."""
    res = minimize(lambda x: x.sum(), torch.zeros(3, dtype=DT), method="newton-exact")
    assert res.status == "unbounded" and not res.converged, res.message


def test_newton_dense_on_a_piecewise_linear_objective_does_not_crash():
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=gen, dtype=DT), torch.randn(20, generator=gen, dtype=DT)

    def relu_l1(w):  # the Hessian is zero almost everywhere
        return (torch.relu(X @ w[:3] + w[3]) - y).abs().mean()

    for kwargs in (dict(method="newton-exact"), dict(options=dict(xtol=1e-12))):
        res = minimize(relu_l1, torch.full((4,), 0.1, dtype=DT), **kwargs)
        assert res.status in ("converged", "stalled") and math.isfinite(res.fun), res.message
        if res.converged:  # truthful: the gradient at x is what it claims
            x = res.x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(relu_l1(x), x)
            assert float(g.norm()) <= 1e-6


@pytest.mark.parametrize("method", ["newton-exact", "auto"])
def test_newton_dense_detects_a_stall_like_newton_cg(method):
    """gtol = 0 is below rounding: dense Newton ran its 1000 iterations, forming the Hessian
    each time, and told the user to raise maxiter; Newton-CG stopped as stalled."""
    A = torch.diag(torch.logspace(0, 4, 10, dtype=DT))
    res = minimize(
        lambda x: 0.5 * x @ A @ x - x.sum(), torch.zeros(10, dtype=DT), method=method, gtol=0
    )
    assert res.status == "stalled" and not res.converged, res.message
    assert res.nit <= STALL_NIT and "below xtol" in res.message
    torch.testing.assert_close(res.x, 1 / torch.diagonal(A), rtol=STALL_RTOL, atol=0)
