"""second.hypergradient (implicit/_hypergradient.py) against closed forms, dense IFT and finite differences."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import hessian, jacrev

from implicit_cases import (
    FD_TOL,
    MATVEC_FACTOR,
    REL_TOL,
    UNROLL_TOL,
    dense_ift,
    newton,
    rel,
    ridge,
)
from second import ConvergenceWarning, NegativeCurvatureWarning, hypergradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ridge_closed_form(dtype):
    inner, outer, w, h, exact = ridge(dtype)
    res = hypergradient(inner, outer, w, h)
    assert res.grad.shape == h.shape and res.grad.dtype == dtype
    assert rel(res.grad, exact) <= REL_TOL[dtype]
    assert res.solve.converged and res.solve.method == "cg"
    assert res.solve.matvecs <= MATVEC_FACTOR * h.numel()
    assert res.inner_residual < 1e-4


@pytest.mark.parametrize("method", ["cg", "minres", "dense"])
def test_ridge_every_method(method):
    inner, outer, w, h, exact = ridge(torch.float64)
    res = hypergradient(inner, outer, w, h, method=method)
    assert rel(res.grad, exact) <= REL_TOL[torch.float64]


def test_damping_matches_dense_damped_solve():
    inner, outer, w, h, _ = ridge(torch.float64)
    lam = 0.3
    H = hessian(inner)(w, h)
    C = jacrev(jacrev(inner, argnums=0), argnums=1)(w, h)
    gw = jacrev(outer)(w, h)
    expected = -C.T @ torch.linalg.solve(H + lam * torch.eye(len(w), dtype=w.dtype), gw)
    res = hypergradient(inner, outer, w, h, damping=lam)
    assert rel(res.grad, expected) <= REL_TOL[torch.float64]


def test_warm_start_saves_products():
    inner, outer, w, h, exact = ridge(torch.float64)
    cold = hypergradient(inner, outer, w, h)
    warm = hypergradient(inner, outer, w, h, x0=cold.solve.x)
    assert warm.solve.matvecs < cold.solve.matvecs
    assert rel(warm.grad, exact) <= REL_TOL[torch.float64]


# ----------------------------------------------------------------------------- dense IFT + FD
def logistic(n=60, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = (X @ torch.randn(d, generator=g, dtype=torch.float64) > 0).double()
    Xv = torch.randn(n, d, generator=g, dtype=torch.float64)
    tv = (Xv[:, 0] > 0).double()
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def inner(w, h):
        return bce(X @ w, t) + 0.5 * (h.exp() * w**2).sum()

    def outer(w, h):
        return bce(Xv @ w, tv)

    h = torch.linspace(-3.0, -1.0, d, dtype=torch.float64)
    w = newton(inner, torch.zeros(d, dtype=torch.float64), h)
    return inner, outer, w, h


def test_logistic_matches_dense_ift_and_finite_differences():
    inner, outer, w, h = logistic()
    ref = dense_ift(inner, outer, w, h)
    res = hypergradient(inner, outer, w, h)
    assert rel(res.grad, ref) <= REL_TOL[torch.float64]

    eps = 1e-5
    fd = torch.empty_like(h)
    for j in range(len(h)):
        e = torch.zeros_like(h)
        e[j] = eps
        up = outer(newton(inner, w, h + e, iters=8), h + e)
        down = outer(newton(inner, w, h - e, iters=8), h - e)
        fd[j] = (up - down) / (2 * eps)
    assert rel(res.grad, fd) <= FD_TOL


def test_outer_loss_depending_on_hparams_directly():
    inner, outer, w, h = logistic()

    def outer2(w, h):
        return outer(w, h) + 0.1 * (h**2).sum()

    res = hypergradient(inner, outer2, w, h)
    assert rel(res.grad, dense_ift(inner, outer2, w, h)) <= REL_TOL[torch.float64]
    assert rel(res.direct, 0.2 * h) <= REL_TOL[torch.float64]


# ----------------------------------------------------------------------------- unrolling
def test_unrolled_differentiation_converges_to_implicit():
    inner, outer, w_star, h, exact = ridge(torch.float64)
    errors = []
    H = hessian(inner)(w_star, h)
    lr = 1.0 / float(torch.linalg.eigvalsh(H)[-1])
    for steps in (20, 100, 400):
        hh = h.clone().requires_grad_(True)
        w = torch.zeros_like(w_star, requires_grad=True)
        for _ in range(steps):  # unrolled gradient descent, graph kept
            (g,) = torch.autograd.grad(inner(w, hh), w, create_graph=True)
            w = w - lr * g
        (unrolled,) = torch.autograd.grad(outer(w, hh), hh)
        errors.append(rel(unrolled, exact))
    assert errors[0] > errors[1] > errors[2]
    assert errors[-1] <= UNROLL_TOL
    implicit = hypergradient(inner, outer, w_star, h).grad
    assert rel(implicit, exact) <= REL_TOL[torch.float64]


# ----------------------------------------------------------------------------- structures
def two_layer_problem():
    """Params {'a': [3], 'b': [2, 2]} coupled through a full quadratic; hparams a tuple."""
    g = torch.Generator().manual_seed(3)
    M = torch.randn(7, 7, generator=g, dtype=torch.float64)
    A = M @ M.T + 7 * torch.eye(7, dtype=torch.float64)  # off-diagonal blocks are dense
    B = torch.randn(7, 4, generator=g, dtype=torch.float64)
    c = torch.randn(7, generator=g, dtype=torch.float64)

    def flat(p):
        return torch.cat([p["a"].reshape(-1), p["b"].reshape(-1)])

    def inner(p, hp):
        z = flat(p)
        u = torch.cat([hp[0].reshape(-1), hp[1].reshape(-1)])
        return 0.5 * z @ A @ z - z @ (B @ u) + 0.25 * (u**2).sum() * (z**2).sum() * 0.01

    def outer(p, hp):
        return ((flat(p) - c) ** 2).sum() + hp[1].sum()

    return inner, outer, flat


def test_dict_params_and_tuple_hparams_match_dense():
    inner, outer, flat = two_layer_problem()
    hp = (
        torch.tensor([0.5, -1.0], dtype=torch.float64),
        torch.tensor([[0.2, 0.3]], dtype=torch.float64),
    )

    def inner_flat(z, u):
        return inner({"a": z[:3], "b": z[3:].reshape(2, 2)}, (u[:2], u[2:].reshape(1, 2)))

    def outer_flat(z, u):
        return outer({"a": z[:3], "b": z[3:].reshape(2, 2)}, (u[:2], u[2:].reshape(1, 2)))

    u = torch.cat([hp[0], hp[1].reshape(-1)])
    z = newton(inner_flat, torch.zeros(7, dtype=torch.float64), u)
    params = {"a": z[:3].clone(), "b": z[3:].reshape(2, 2).clone()}
    res = hypergradient(inner, outer, params, hp)
    assert isinstance(res.grad, tuple) and res.grad[1].shape == (1, 2)
    assert isinstance(res.solve.x, dict) and set(res.solve.x) == {"a", "b"}
    ref = dense_ift(inner_flat, outer_flat, z, u)
    assert rel(torch.cat([res.grad[0], res.grad[1].reshape(-1)]), ref) <= REL_TOL[torch.float64]


def test_named_parameters_of_a_module():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, 1, dtype=torch.float64)
    log_wd = {
        "weight": torch.zeros(1, 3, dtype=torch.float64),
        "bias": torch.zeros(1, dtype=torch.float64),
    }

    def inner(p, hp):
        pred = torch.func.functional_call(model, p, (X,))
        return ((pred - y) ** 2).mean() + sum(0.5 * (hp[k].exp() * p[k] ** 2).sum() for k in p)

    def outer(p, hp):
        return torch.func.functional_call(model, p, (X[:5],)).pow(2).mean()

    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.LBFGS(
        list(params.values()),
        lr=1,
        max_iter=200,
        tolerance_grad=1e-14,
        tolerance_change=0,
        line_search_fn="strong_wolfe",
    )
    for p in params.values():
        p.requires_grad_(True)

    def closure():
        opt.zero_grad()
        loss = inner(params, log_wd)
        loss.backward()
        return loss

    opt.step(closure)
    res = hypergradient(inner, outer, params, log_wd)
    assert set(res.grad) == {"weight", "bias"} and res.grad["weight"].shape == (1, 3)
    assert res.inner_residual < 1e-8

    # dense reference on the flattened problem
    def unflat(z):
        return {"weight": z[:3].reshape(1, 3), "bias": z[3:]}

    u = torch.zeros(4, dtype=torch.float64)

    def hp_of(u):
        return {"weight": u[:3].reshape(1, 3), "bias": u[3:]}

    z = torch.cat([params["weight"].detach().reshape(-1), params["bias"].detach()])
    ref = dense_ift(
        lambda z, u: inner(unflat(z), hp_of(u)), lambda z, u: outer(unflat(z), hp_of(u)), z, u
    )
    got = torch.cat([res.grad["weight"].reshape(-1), res.grad["bias"]])
    assert rel(got, ref) <= 1e-7  # L-BFGS optimum (residual ~1e-9), not a Newton one


# ----------------------------------------------------------------------------- warnings, errors
def test_unconverged_inner_problem_warns():
    inner, outer, w_star, h, _ = ridge(torch.float64)
    with pytest.warns(ConvergenceWarning, match="inner problem is not solved"):
        res = hypergradient(inner, outer, w_star + 0.1, h)
    assert res.inner_residual > 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hypergradient(inner, outer, w_star + 0.1, h, inner_tol=None)


def test_indefinite_inner_hessian_warns_and_switches_to_minres():
    A = torch.diag(torch.tensor([3.0, -1.0, 2.0], dtype=torch.float64))
    A[0, 1] = A[1, 0] = 0.5

    def inner(w, h):  # stationary point w = A^-1 h is a saddle
        return 0.5 * w @ A @ w - h @ w

    def outer(w, h):
        return (w**2).sum()

    h = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    w = torch.linalg.solve(A, h)
    with pytest.warns(NegativeCurvatureWarning, match="MINRES"):
        res = hypergradient(inner, outer, w, h)
    assert res.solve.method == "cg->minres" and res.solve.converged
    expected = torch.linalg.solve(A, 2 * w)  # d/dh |A^-1 h|^2 = 2 A^-1 w
    assert rel(res.grad, expected) <= REL_TOL[torch.float64]


def test_unconverged_linear_solve_warns():
    inner, outer, w, h, _ = ridge(torch.float64)
    with pytest.warns(ConvergenceWarning):
        hypergradient(inner, outer, w, h, maxiter=1)


def test_hparams_not_in_graph_is_a_clear_error():
    inner, outer, w, h, _ = ridge(torch.float64)
    with pytest.raises(ValueError, match=r"hparams\[1\] is not in the graph of inner_loss"):
        hypergradient(lambda w, hp: inner(w, hp[0]), outer, w, (h, torch.ones(2, dtype=w.dtype)))
    with pytest.raises(ValueError, match="hparams is not in the graph of inner_loss"):
        hypergradient(lambda w, hp: inner(w, hp.detach()), outer, w, h)


def test_hparam_in_loss_but_not_in_gradient_has_zero_implicit_part():
    inner, outer, w, h, exact = ridge(torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64)
    res = hypergradient(lambda w, hp: inner(w, hp[0]) + hp[1] ** 2, outer, w, (h, s))
    assert float(res.grad[1]) == 0.0
    assert rel(res.grad[0], exact) <= REL_TOL[torch.float64]


def test_bad_inputs():
    inner, outer, w, h, _ = ridge(torch.float64)
    with pytest.raises(ValueError, match="params is not in the graph"):
        hypergradient(lambda w, h: (h**2).sum(), outer, w, h)
    with pytest.raises(ValueError, match="depends neither"):
        hypergradient(inner, lambda w, h: torch.tensor(1.0), w, h)
    with pytest.raises(ValueError, match="scalar"):
        hypergradient(inner, lambda w, h: w, w, h)
    with pytest.raises(TypeError, match="hparams must be a tensor"):
        hypergradient(inner, outer, w, 3.0)
    with pytest.raises(TypeError, match="floating"):
        hypergradient(inner, outer, w, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="unknown method"):
        hypergradient(inner, outer, w, h, method="normal_cg")


def test_inner_tol_is_relative_to_the_problem_scale():
    # inner_tol was absolute on ||grad_w L_in||: a loss scaled by 1e-6 hid an inner point 0.1
    # off the optimum (hypergradient 24% off, ||grad|| = 5e-7 < 1e-4), and a loss scaled by
    # 1e8 warned at a point 1e-9 off (hypergradient exact to 2e-9). The test is now on the
    # Newton step, the estimated distance to the optimum, relative to ||params||.
    inner, outer, w_star, h, exact = ridge(torch.float64)

    def small(w, h):
        return 1e-6 * inner(w, h)

    off = w_star + 0.1
    with pytest.warns(ConvergenceWarning, match="inner problem is not solved"):
        res = hypergradient(small, outer, off, h)
    assert res.inner_residual < 1e-4  # the old absolute test passed this point
    assert rel(res.grad, exact) > 0.1  # and the hypergradient is visibly wrong there
    H = hessian(small)(off, h)
    step = float(torch.linalg.solve(H, jacrev(small)(off, h)).norm())  # dense float64 Newton
    assert abs(res.info["newton_step"] - step) <= 1e-2 * step

    def big(w, h):
        return 1e8 * inner(w, h)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = hypergradient(big, outer, w_star + 1e-9, h)
    assert res.inner_residual > 1e-4  # the old absolute test warned here
    assert rel(res.grad, exact) <= REL_TOL[torch.float64]  # 1e-9 off w*: still exact


def test_frozen_parameter_is_refused():
    # dict(model.named_parameters()) with a frozen bias silently made it an inner variable
    torch.manual_seed(0)
    X = torch.randn(50, 3, dtype=torch.float64)
    y = torch.randn(50, 1, dtype=torch.float64)
    Xv = torch.randn(20, 3, dtype=torch.float64)
    yv = torch.randn(20, 1, dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    model.bias.requires_grad_(False)
    call = torch.func.functional_call

    def inner(p, h):
        return ((call(model, p, (X,)) - y) ** 2).mean() + h.exp().sum() * (p["weight"] ** 2).sum()

    def outer(p, h):
        return ((call(model, p, (Xv,)) - yv) ** 2).mean()

    h = torch.tensor([-1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"frozen parameters .*params\['bias'\]"):
        hypergradient(inner, outer, dict(model.named_parameters()), h)

    # the fix the message names: only the trainable parameters (functional_call takes the
    # module's own bias), at their optimum; against the dense implicit function theorem
    b = model.bias.detach()

    def inner_w(w, h):
        return inner({"weight": w.reshape(1, 3), "bias": b}, h)

    w = newton(inner_w, torch.zeros(3, dtype=torch.float64), h)
    trainable = {"weight": w.reshape(1, 3)}
    res = hypergradient(inner, outer, trainable, h)
    ref = dense_ift(inner_w, lambda w, h: outer({"weight": w.reshape(1, 3), "bias": b}, h), w, h)
    assert rel(res.grad, ref) <= REL_TOL[torch.float64]


def test_negative_damping_is_refused():
    inner, outer, w, h, _ = ridge(torch.float64)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            hypergradient(inner, outer, w, h, damping=bad)
