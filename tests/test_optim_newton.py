"""Newton-type optimizers: trust-region subproblems, NewtonCG, GaussNewton, HessianFree, LiSSA,
second.minimize."""

from __future__ import annotations

import math

import pytest
import torch

import second
from second.newton.model_cg import model_cg
from second.newton.trust_region import boundary_step, update_radius
from second.optim import (
    GaussNewton,
    HessianFree,
    LiSSA,
    NewtonCG,
    exact_trust_region,
    minimize,
    plot_history,
    steihaug_cg,
)
from second.optim.gauss_newton import lm_damping_update

DT = torch.float64
# Tolerances. Loosening one is a visible, commented change.
EXACT = dict(rtol=1e-9, atol=1e-10)  # float64 quantities that are exact up to round-off
SOLUTION_TOL = 1e-8  # max abs error of a converged optimizer's solution
NORM_TOL = 1e-10  # |  ||p|| - radius |  for a step on the boundary
LISSA_STOCHASTIC_TOL = 5e-2  # relative error of the stochastic LiSSA-Newton solution


def spd(n, cond=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    evals = torch.logspace(0, math.log10(cond), n, dtype=DT)
    return Q @ torch.diag(evals) @ Q.T


def indefinite(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    evals = torch.linspace(-2.0, 3.0, n, dtype=DT)
    return Q @ torch.diag(evals) @ Q.T


def model_value(H, g, p):
    return float(g @ p + 0.5 * p @ H @ p)


def rosen(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


def quadratic_problem(n=6, seed=1):
    A = spd(n, cond=50.0, seed=seed)
    b = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    x_star = torch.linalg.solve(A, b)
    return A, b, x_star, (lambda x: 0.5 * x @ A @ x - b @ x)


# ----------------------------------------------------------------------------- subproblems
def test_boundary_step_solves_the_quadratic():
    tau = boundary_step(0.25, 0.1, 2.0, 1.0)
    assert math.isclose(0.25 + 2 * 0.1 * tau + 2.0 * tau * tau, 1.0, rel_tol=1e-12)
    assert tau > 0


def test_steihaug_interior_equals_newton_step():
    H = spd(8)
    g = torch.randn(8, dtype=DT)
    res = steihaug_cg(lambda v: H @ v, g, radius=1e6, rtol=1e-12)
    assert res.status == "converged"
    assert res.iterations <= 8
    torch.testing.assert_close(res.step, -torch.linalg.solve(H, g), **EXACT)
    assert math.isclose(res.predicted_reduction, -model_value(H, g, res.step), rel_tol=1e-9)


def test_steihaug_indefinite_goes_to_boundary_along_negative_curvature():
    H = torch.diag(torch.tensor([2.0, -1.0, 1.0], dtype=DT))
    g = torch.tensor([0.1, 1.0, 0.1], dtype=DT)  # g^T H g < 0: negative curvature at once
    res = steihaug_cg(lambda v: H @ v, g, radius=3.0, rtol=1e-12)
    assert res.status == "negative_curvature"
    assert abs(res.step_norm - 3.0) < NORM_TOL
    assert abs(float(res.step.norm()) - 3.0) < NORM_TOL
    # the model keeps decreasing past the unconstrained stationary point, and the step is
    # the boundary point of the first CG direction d = -g (negative curvature at j = 0)
    torch.testing.assert_close(res.step, -3.0 * g / g.norm(), **EXACT)
    assert math.isclose(res.predicted_reduction, -model_value(H, g, res.step), rel_tol=1e-9)
    assert res.predicted_reduction > 0


def test_steihaug_random_indefinite_reaches_boundary_and_decreases_model():
    H = indefinite(20, seed=3)
    g = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(4))
    res = steihaug_cg(lambda v: H @ v, g, radius=5.0, rtol=1e-10)
    assert res.on_boundary
    assert abs(res.step_norm - 5.0) < NORM_TOL
    # at least the Cauchy decrease along -g
    cauchy = steihaug_cg(lambda v: H @ v, g, radius=5.0, maxiter=1)
    assert res.predicted_reduction >= cauchy.predicted_reduction - 1e-12


def test_steihaug_spd_small_radius_stops_on_boundary():
    H = spd(10)
    g = torch.randn(10, dtype=DT)
    res = steihaug_cg(lambda v: H @ v, g, radius=1e-2, rtol=1e-12)
    assert res.status == "boundary"
    assert abs(float(res.step.norm()) - 1e-2) < NORM_TOL


@pytest.mark.parametrize("H", [spd(12, cond=100.0), indefinite(12, seed=5)])
@pytest.mark.parametrize("small", [1e-3, 0.3, 2.0])
def test_path_cut_equals_fresh_solve(H, small):
    g = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(7))
    big = steihaug_cg(lambda v: H @ v, g, radius=50.0, rtol=1e-10)
    fresh = steihaug_cg(lambda v: H @ v, g, radius=small, rtol=1e-10)
    cut = big.path.cut(small)
    assert cut.status == fresh.status
    torch.testing.assert_close(cut.step, fresh.step, **EXACT)
    assert math.isclose(cut.predicted_reduction, fresh.predicted_reduction, rel_tol=1e-8)


def test_preconditioned_steihaug_uses_the_preconditioner_norm():
    H = spd(10, cond=1e4)
    Hinv = torch.linalg.inv(H)
    g = torch.randn(10, dtype=DT)
    exact = steihaug_cg(lambda v: H @ v, g, radius=1e8, rtol=1e-12, M=lambda r: Hinv @ r)
    assert exact.iterations == 1  # M = H^-1: one preconditioned CG step is Newton's step
    torch.testing.assert_close(exact.step, -Hinv @ g, **EXACT)
    res = steihaug_cg(lambda v: H @ v, g, radius=1e-3, rtol=1e-12, M=lambda r: Hinv @ r)
    # the region is ||p||_{M^-1} = sqrt(p^T H p) <= radius
    assert res.on_boundary
    assert abs(math.sqrt(float(res.step @ H @ res.step)) - 1e-3) < 1e-12


def test_steihaug_rejects_bad_input():
    H = spd(3)
    with pytest.raises(ValueError):
        steihaug_cg(lambda v: H @ v, torch.ones(3, dtype=DT), radius=0.0)
    with pytest.raises(ValueError):
        steihaug_cg(lambda v: H @ v, torch.ones(3, dtype=DT), radius=1.0, M=lambda r: -r)


@pytest.mark.parametrize("radius", [0.05, 0.5, 100.0])
@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_exact_trust_region_satisfies_optimality(radius, kind):
    H = spd(8) if kind == "spd" else indefinite(8, seed=2)
    g = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(9))
    res = exact_trust_region(H, g, radius)
    p = res.step
    assert float(p.norm()) <= radius * (1 + 1e-8)
    # Moré-Sorensen: (H + mu I) p = -g with mu >= 0, H + mu I PSD, mu (radius - ||p||) = 0
    r = H @ p + g
    mu = -float(r @ p) / float(p @ p)
    torch.testing.assert_close(H @ p + mu * p, -g, rtol=1e-6, atol=1e-8)
    assert mu >= -1e-8
    assert float(torch.linalg.eigvalsh(H + mu * torch.eye(8, dtype=DT))[0]) >= -1e-8
    # no Steihaug step does better
    st = steihaug_cg(lambda v: H @ v, g, radius=radius, rtol=1e-12)
    assert res.predicted_reduction >= st.predicted_reduction - 1e-10


def test_exact_trust_region_hard_case():
    H = torch.diag(torch.tensor([-1.0, 2.0], dtype=DT))
    g = torch.tensor([0.0, 1.0], dtype=DT)  # orthogonal to the lowest eigenvector
    res = exact_trust_region(H, g, radius=2.0)
    assert abs(float(res.step.norm()) - 2.0) < NORM_TOL
    assert abs(float(res.step[0])) > 1.0  # moves along the negative-curvature direction


def test_update_radius_rules():
    assert update_radius(1.0, float("nan"), 0.5, True) == 0.125
    assert update_radius(1.0, 0.9, 1.0, True, max_radius=1.5) == 1.5
    assert update_radius(1.0, 0.9, 0.3, False) == 1.0
    assert update_radius(1.0, 0.5, 1.0, True) == 1.0


def test_model_cg_tracks_the_quadratic_model():
    A = spd(6)
    g = torch.randn(6, dtype=DT)
    res = model_cg(lambda v: A @ v, g, maxiter=50, rtol=1e-12, save_at={1, 2, 3})
    torch.testing.assert_close(res.x, -torch.linalg.solve(A, g), **EXACT)
    torch.testing.assert_close(res.Ax, A @ res.x, **EXACT)
    assert math.isclose(res.phi, model_value(A, g, res.x), rel_tol=1e-9)
    assert [i for i, _, _ in res.saved][:3] == [1, 2, 3]
    warm = model_cg(lambda v: A @ v, g, x0=res.x, rtol=1e-10)
    assert warm.iterations == 0 and warm.products == 1


# ----------------------------------------------------------------------------- NewtonCG
def test_newton_cg_one_step_on_a_quadratic():
    A, b, x_star, f = quadratic_problem(n=6)
    x = torch.zeros(6, dtype=DT, requires_grad=True)
    opt = NewtonCG([x], initial_radius=1e3, cg_rtol=1e-12, tolerance_grad=1e-9)
    opt.step(lambda: f(x))
    assert torch.allclose(x.detach(), x_star, atol=SOLUTION_TOL, rtol=0)
    st = opt.state[x]
    assert st["n_iter"] == 1 and st["nhvp"] <= 6  # at most n CG steps
    opt.step(lambda: f(x))
    assert opt.converged and "converged" in opt.stop_reason


def test_newton_cg_rosenbrock_and_counters():
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], max_iter=200, tolerance_grad=1e-10)
    opt.step(lambda: rosen(x))
    assert opt.converged
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=DT), rtol=0, atol=SOLUTION_TOL)
    st = opt.state[x]
    assert st["nfev"] == st["n_iter"] + 1  # one trial per iteration, plus the start
    assert st["ngev"] == st["n_iter"] - st.get("n_rejected", 0) + 1
    hist = opt.history
    assert all(h2["nhvp"] >= h1["nhvp"] for h1, h2 in zip(hist, hist[1:]))
    assert hist[-1]["grad_norm"] <= 1e-10


def test_newton_cg_rejected_step_costs_no_hvp():
    x = torch.tensor([3.0], dtype=DT, requires_grad=True)

    def f():  # convex, but the Newton step from 3 lands at -27: far too long
        return (torch.sqrt(1 + x * x) - 1).sum()

    opt = NewtonCG([x], initial_radius=100.0, cg_rtol=1e-12)
    opt.step(f)
    st = opt.state[x]
    assert st["n_rejected"] == 1 and st["radius"] < 100.0 and st["nhvp"] == 1
    assert float(x.detach()) == 3.0  # a rejected step leaves the parameters where they were
    opt.step(f)  # re-solved from the stored CG path: no new product
    assert st["n_rejected"] == 2 and st["nhvp"] == 1
    opt.step(f)
    assert st["n_rejected"] == 2 and float(f().detach()) < math.sqrt(10.0) - 1


def test_newton_cg_with_preconditioner_converges():
    A, b, x_star, f = quadratic_problem(n=6)
    Ainv = torch.linalg.inv(A)
    x = torch.zeros(6, dtype=DT, requires_grad=True)
    opt = NewtonCG([x], initial_radius=1e3, cg_rtol=1e-12, preconditioner=lambda r: Ainv @ r)
    opt.step(lambda: f(x))
    assert opt.state[x]["nhvp"] == 1
    torch.testing.assert_close(x.detach(), x_star, rtol=0, atol=SOLUTION_TOL)


def test_newton_cg_and_minimize_reach_the_same_minimizer():
    # NewtonCG (the optimizer) and minimize(method="newton-cg") (the Newton core, with
    # Eisenstat-Walker forcing and an L-BFGS preconditioner) follow different paths; both
    # must reach the minimizer, and the core's counters must be consistent
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], tolerance_grad=1e-8)

    def closure():
        return rosen(x)

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
    opt = NewtonCG([x], max_iter=100, tolerance_grad=1e-9)
    opt.step(lambda: rosen(x))
    assert opt.converged
    with torch.no_grad():
        x.add_(0.3)
    opt.step(lambda: rosen(x))
    assert opt.converged
    torch.testing.assert_close(x.detach(), torch.ones(2, dtype=DT), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- GaussNewton
@pytest.mark.parametrize("solver", ["cg", "dense"])
def test_gauss_newton_linear_least_squares_in_one_step(solver):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=DT)
    y = torch.randn(30, 1, generator=g, dtype=DT)
    model = torch.nn.Linear(4, 1).to(DT)
    opt = GaussNewton(
        model.parameters(), damping=1e-12, solver=solver, cg_rtol=1e-12, tolerance_grad=1e-10
    )

    def closure():
        out = model(X)
        return torch.nn.functional.mse_loss(out, y), out

    opt.step(closure)
    A = torch.cat([X, torch.ones(30, 1, dtype=DT)], 1)
    sol = torch.linalg.lstsq(A, y).solution.reshape(-1)
    got = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    torch.testing.assert_close(got, sol, rtol=0, atol=SOLUTION_TOL)
    opt.step(closure)
    assert opt.converged


def rosen_residual(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def test_lm_damping_rises_on_rejected_steps():
    assert lm_damping_update(1.0, 2.0, -0.5) == (2.0, 4.0)
    assert lm_damping_update(1.0, 2.0, 0.9)[0] < 1.0
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    # an (almost) undamped, exactly solved GN step overshoots here
    opt = GaussNewton([x], damping=1e-10, solver="dense")

    def closure():
        r = rosen_residual(x)
        return 0.5 * (r * r).sum(), r

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
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = GaussNewton([x], solver=solver, tolerance_grad=1e-9)

    def closure():
        r = rosen_residual(x)
        return 0.5 * (r * r).sum(), r

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
    assert res.matvecs == opt.state[x]["nhvp"]


def test_gauss_newton_closure_must_return_pair():
    x = torch.ones(2, dtype=DT, requires_grad=True)
    opt = GaussNewton([x])
    with pytest.raises(TypeError, match="loss, output"):
        opt.step(lambda: (x * x).sum())


# ----------------------------------------------------------------------------- HessianFree
def small_regression(seed=0):
    torch.manual_seed(seed)
    X = torch.randn(128, 4, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(
        DT
    )

    def closure(n=128):
        def c():
            out = model(X[:n])
            return torch.nn.functional.mse_loss(out, y[:n]), out

        return c

    return model, closure


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_hessian_free_decreases_the_loss(curvature):
    model, closure = small_regression()
    opt = HessianFree(model.parameters(), curvature=curvature, damping=1.0)
    first = float(opt.step(closure(), curvature_closure=closure(32)))
    for _ in range(15):
        last = float(opt.step(closure(), curvature_closure=closure(32)))
    assert last < 0.5 * first
    st = opt.state[next(iter(model.parameters()))]
    assert st["nhvp"] > 0 and st["direction"].shape == (sum(p.numel() for p in model.parameters()),)
    assert all(h["loss"] <= first + 1e-12 for h in opt.history)


def test_hessian_free_damping_rises_when_the_model_is_poor():
    model, closure = small_regression()
    opt = HessianFree(model.parameters(), damping=1e-6, cg_max_iter=100)
    dampings = []
    for _ in range(6):
        opt.step(closure(), curvature_closure=closure(8))  # tiny curvature batch: poor model
        dampings.append(opt.history[-1])
    rhos = [h["rho"] for h in dampings]
    damp = [h["damping"] for h in dampings]
    for i in range(1, len(damp)):
        if rhos[i] < 0.25:
            assert damp[i] > damp[i - 1]


# ----------------------------------------------------------------------------- LiSSA
def convex_problem(n=256, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.arange(1.0, d + 1, dtype=DT)
    y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=DT)
    w_star = torch.linalg.lstsq(X, y).solution
    return X, y, w_star


def test_lissa_deterministic_is_newton_on_a_quadratic():
    X, y, w_star = convex_problem()
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = LiSSA([w], depth=400)
    for _ in range(3):
        opt.step(lambda: ((X @ w - y) ** 2).mean())
    torch.testing.assert_close(w.detach(), w_star, rtol=0, atol=1e-6)


def test_lissa_stochastic_converges_near_the_solution():
    X, y, w_star = convex_problem()
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = LiSSA([w], depth=150, repeats=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, 256, (64,), generator=gen)
        opt.step(
            lambda: ((X @ w - y) ** 2).mean(), lambda idx=idx: ((X[idx] @ w - y[idx]) ** 2).mean()
        )
    err = float((w.detach() - w_star).norm() / w_star.norm())
    assert err < LISSA_STOCHASTIC_TOL
    st = opt.state[w]
    assert st["nhvp"] >= 4 * 150 * 2 and st["scale"] > 0


# ----------------------------------------------------------------------------- state_dict
def _make(cls, x):
    kwargs = {NewtonCG: {}, GaussNewton: {}, HessianFree: {}, LiSSA: dict(depth=20)}[cls]
    return cls([x], **kwargs)


def _closure_for(cls, x):
    def f():
        return rosen(x) if cls in (NewtonCG, LiSSA) else None

    def pair():
        r = rosen_residual(x)
        return 0.5 * (r * r).sum(), r

    return f if cls in (NewtonCG, LiSSA) else pair


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton, HessianFree, LiSSA])
def test_state_dict_round_trip(cls):
    x = (
        torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
        if cls is not LiSSA
        else torch.tensor([0.9, 0.8], dtype=DT, requires_grad=True)
    )  # LiSSA needs convexity
    opt = _make(cls, x)
    closure = _closure_for(cls, x)
    for _ in range(3):
        opt.step(closure)
    sd = opt.state_dict()
    x2 = x.detach().clone().requires_grad_(True)
    opt2 = _make(cls, x2)
    opt2.load_state_dict(sd)
    s1, s2 = opt.state[x], opt2.state[x2]
    assert set(s1) == set(s2)
    for k in ("n_iter", "nfev", "ngev", "nhvp", "radius", "damping", "scale"):
        if k in s1:
            assert s1[k] == s2[k]
    assert opt2.param_groups[0] == {**opt.param_groups[0], "params": opt2.param_groups[0]["params"]}
    # the reloaded optimizer continues exactly like the original
    opt.step(closure)
    opt2.step(_closure_for(cls, x2))
    torch.testing.assert_close(x2.detach(), x.detach(), **EXACT)


# ----------------------------------------------------------------------------- validation
BAD = [
    (NewtonCG, dict(initial_radius=0.0)),
    (NewtonCG, dict(initial_radius=2.0, max_radius=1.0)),
    (NewtonCG, dict(eta=0.3)),
    (NewtonCG, dict(max_iter=0)),
    (NewtonCG, dict(cg_rtol=1.5)),
    (NewtonCG, dict(tolerance_grad=-1.0)),
    (NewtonCG, dict(preconditioner=3)),
    (GaussNewton, dict(damping=-1.0)),
    (GaussNewton, dict(damping=1e-20)),
    (GaussNewton, dict(solver="qr")),
    (GaussNewton, dict(eta=1.0)),
    (GaussNewton, dict(cg_max_iter=0)),
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


# ----------------------------------------------------------------------------- minimize
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


# ----------------------------------------------------------------------------- plotting
def test_plot_history():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=DT))
    x = torch.tensor([-1.2, 1.0], dtype=DT, requires_grad=True)
    opt = NewtonCG([x], max_iter=50)
    opt.step(lambda: rosen(x))
    fig = plot_history({"minimize": res, "optimizer": opt}, x="nfev")
    ax_loss, ax_grad = fig.axes
    assert len(ax_loss.lines) == 2 and len(ax_grad.lines) == 2
    assert list(ax_loss.lines[0].get_xdata()) == [h["nfev"] for h in res.history]
    with pytest.raises(ValueError):
        plot_history(res, x="seconds")
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("cls", [NewtonCG, GaussNewton])
def test_a_new_closure_is_evaluated_afresh(cls):
    """Mini-batch use: a new closure object (new batch) is not served the cached evaluation."""
    g = torch.Generator().manual_seed(0)
    XA, XB = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, 3, generator=g, dtype=DT)
    yA, yB = torch.randn(20, 1, generator=g, dtype=DT), torch.randn(20, 1, generator=g, dtype=DT)
    model = torch.nn.Linear(3, 1).to(DT)

    def make(X, y):
        def closure():
            out = model(X)
            loss = torch.nn.functional.mse_loss(out, y)
            return loss if cls is NewtonCG else (loss, out)

        return closure

    opt = cls(model.parameters())
    cA = make(XA, yA)
    opt.step(cA)
    opt.step(cA)  # same closure: reuses the accepted trial's evaluation
    nfev = opt.state[model.weight]["nfev"]
    with torch.no_grad():
        expected = float(torch.nn.functional.mse_loss(model(XB), yB))
    opt.step(make(XB, yB))
    assert opt.history[-1]["loss"] == pytest.approx(expected, rel=1e-12)
    assert opt.state[model.weight]["nfev"] == nfev + 2  # fresh evaluation + one trial


def test_minimize_newton_exact_lazy_hessian():
    x0 = torch.tensor([-1.2, 1.0], dtype=DT)
    fresh = minimize(rosen, x0, method="newton-exact", gtol=1e-9)
    lazy = minimize(rosen, x0, method="newton-exact", gtol=1e-9, options=dict(hessian_every=5))
    assert lazy.converged
    torch.testing.assert_close(lazy.x, torch.ones(2, dtype=DT), rtol=0, atol=SOLUTION_TOL)
    assert lazy.matvecs < fresh.matvecs
    with pytest.raises(ValueError):
        minimize(rosen, x0, method="newton-exact", options=dict(hessian_every=0))


def test_newton_cg_extrapolation_helps_in_a_flattening_valley():
    def run(extrapolation):
        x = torch.tensor([-3.0], dtype=DT, requires_grad=True)
        opt = NewtonCG([x], extrapolation=extrapolation, initial_radius=100.0, tolerance_grad=1e-9)

        def f():  # the model under-predicts the decrease while exp(-x) dominates
            return (torch.exp(-x) + 1e-4 * x * x).sum()

        while opt.stop_reason is None:
            opt.step(f)
        return opt, x.detach()

    plain, x_plain = run(0)
    extra, x_extra = run(5)
    assert plain.converged and extra.converged
    torch.testing.assert_close(x_extra, x_plain, rtol=0, atol=1e-6)
    assert extra.state[next(iter(extra.state))]["n_extrapolated"] >= 1
    assert extra.history[-1]["ngev"] < plain.history[-1]["ngev"]
