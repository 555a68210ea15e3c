"""Implicit differentiation: hypergradient, implicit_root and iMAML against exact answers."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.func import hessian, jacrev

import second
from second import ConvergenceWarning, NegativeCurvatureWarning, hypergradient, implicit_root
from second.implicit import imaml, stationary

# Tolerances. Loosening one is a visible, commented change.
REL_TOL = {  # relative error of a hypergradient vs a closed form or a dense float64 IFT
    torch.float64: 1e-8,
    torch.float32: 1e-3,
}
FD_TOL = 1e-6  # central finite differences (step 1e-5, float64) vs the implicit gradient
UNROLL_TOL = 1e-6  # 400 unrolled gradient steps vs the implicit gradient
COSINE_MIN = 0.9999  # iMAML meta-gradient vs a dense solve
MATVEC_FACTOR = 2  # a converged CG needs at most this many x dim Hessian-vector products


def rel(a, b) -> float:
    return second.relative_error(a, b)


# ----------------------------------------------------------------------------- problems
def ridge(dtype, n=40, d=6, seed=0):
    """Per-feature ridge: inner 1/(2n)||Xw-y||^2 + 1/2 sum exp(h) w^2, outer validation MSE."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    Xv = torch.randn(n, d, generator=g, dtype=torch.float64)
    yv = Xv @ torch.randn(d, generator=g, dtype=torch.float64)
    h = torch.linspace(-2.0, 1.0, d, dtype=torch.float64)

    def inner(w, h):
        return 0.5 * ((X.to(w) @ w - y.to(w)) ** 2).mean() + 0.5 * (h.exp() * w**2).sum()

    def outer(w, h):
        return 0.5 * ((Xv.to(w) @ w - yv.to(w)) ** 2).mean()

    A = X.T @ X / n + torch.diag(h.exp())
    w_star = torch.linalg.solve(A, X.T @ y / n)
    gv = Xv.T @ (Xv @ w_star - yv) / n
    exact = -h.exp() * w_star * torch.linalg.solve(A, gv)  # closed form
    return inner, outer, w_star.to(dtype), h.to(dtype), exact


def newton(inner, w, h, iters=50):
    """Solve a smooth convex inner problem to machine precision (dense Newton)."""
    for _ in range(iters):
        g = jacrev(inner)(w, h)
        H = hessian(inner)(w, h)
        w = w - torch.linalg.solve(H, g)
    return w


def dense_ift(inner, outer, w, h):
    """-(d2 L_in/dh dw) (d2 L_in/dw2)^-1 dL_out/dw + dL_out/dh with dense torch.func matrices."""
    H = hessian(inner, argnums=0)(w, h)
    C = jacrev(jacrev(inner, argnums=0), argnums=1)(w, h)  # [w, h]
    gw, gh = jacrev(outer, argnums=(0, 1))(w, h)
    return gh - C.T @ torch.linalg.solve(H, gw)


# ----------------------------------------------------------------------------- closed forms
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


# ----------------------------------------------------------------------------- implicit_root
def coupled_quadratic():
    g = torch.Generator().manual_seed(5)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + 2 * torch.eye(6, dtype=torch.float64)  # dense: blocks (a, b) coupled
    B = torch.randn(6, 3, generator=g, dtype=torch.float64)

    def inner(w, h):
        z = torch.cat([w[0], w[1].reshape(-1)])
        return 0.5 * z @ A @ z - z @ (B @ h) + 0.1 * (z**4).sum()

    return inner, A, B


def test_implicit_root_multi_tensor_matches_dense():
    inner, A, B = coupled_quadratic()

    def inner_flat(z, h):
        return inner((z[:2], z[2:].reshape(2, 2)), h)

    @implicit_root(stationary(inner))
    def solver(h):
        z = newton(inner_flat, torch.zeros(6, dtype=torch.float64), h)
        return (z[:2].clone(), z[2:].reshape(2, 2).clone())

    h = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64, requires_grad=True)
    a, b = solver(h)
    c = torch.arange(6, dtype=torch.float64)
    loss = (a * c[:2]).sum() + (b.reshape(-1) * c[2:]).sum() ** 2
    loss.backward()

    z = torch.cat([a.detach(), b.detach().reshape(-1)])
    H = hessian(inner_flat)(z, h.detach())
    assert (H[:2, 2:].abs() > 1e-3).any()  # the off-diagonal block matters
    C = jacrev(jacrev(inner_flat, argnums=0), argnums=1)(z, h.detach())
    gz = torch.cat([c[:2], 2 * (z[2:] @ c[2:]) * c[2:]])
    expected = -C.T @ torch.linalg.solve(H, gz)
    assert rel(h.grad, expected) <= REL_TOL[torch.float64]
    # block-diagonal solve (dropping off-diagonal blocks) would be visibly wrong
    Hbd = H.clone()
    Hbd[:2, 2:] = 0
    Hbd[2:, :2] = 0
    assert rel(-C.T @ torch.linalg.solve(Hbd, gz), expected) > 1e-3
    assert solver.last_solve is not None and solver.last_solve.converged


def test_implicit_root_agrees_with_hypergradient_and_dict_output():
    inner, outer, w_star, h, exact = ridge(torch.float64)

    @implicit_root(stationary(lambda p, h: inner(p["w"], h)))
    def solver(h):
        return {"w": newton(inner, torch.zeros_like(w_star), h, iters=3)}

    hh = h.clone().requires_grad_(True)
    out = solver(hh)
    outer(out["w"], hh).backward()
    assert rel(hh.grad, exact) <= REL_TOL[torch.float64]


def test_implicit_root_nonsymmetric_fixed_point():
    g = torch.Generator().manual_seed(7)
    W = 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)

    def F(x, h):  # root of x - tanh(W x + h): a non-symmetric Jacobian I - D W
        return x - torch.tanh(W @ x + h)

    @implicit_root(F, symmetric=False)
    def fixed_point(h):
        x = torch.zeros(4, dtype=torch.float64)
        for _ in range(200):
            x = torch.tanh(W @ x + h)
        return x

    h = torch.tensor([0.1, 0.2, -0.3, 0.4], dtype=torch.float64, requires_grad=True)
    x = fixed_point(h)
    x.sum().backward()
    J_x = (
        torch.eye(4, dtype=torch.float64)
        - torch.diag(1 - torch.tanh(W @ x.detach() + h.detach()) ** 2) @ W
    )
    J_h = -torch.diag(1 - torch.tanh(W @ x.detach() + h.detach()) ** 2)
    expected = -J_h.T @ torch.linalg.solve(J_x.T, torch.ones(4, dtype=torch.float64))
    assert rel(h.grad, expected) <= REL_TOL[torch.float64]


def test_implicit_root_passes_through_non_tensor_args_and_no_grad():
    inner, outer, w_star, h, exact = ridge(torch.float64)

    @implicit_root(stationary(lambda w, h, iters: inner(w, h)))
    def solver(h, iters):
        assert isinstance(iters, int) and not h.requires_grad
        return newton(inner, torch.zeros_like(w_star), h, iters=iters)

    w = solver(h, 3)  # h does not require grad: a plain tensor comes back
    assert not w.requires_grad and rel(w, w_star) <= REL_TOL[torch.float64]


# ----------------------------------------------------------------------------- iMAML
def imaml_task(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(10, 1, generator=g, dtype=torch.float64)
    y = torch.sin(3 * X)
    Xq = torch.randn(10, 1, generator=g, dtype=torch.float64)
    yq = torch.sin(3 * Xq)
    theta = {
        "w1": 0.5 * torch.randn(8, 1, generator=g, dtype=torch.float64),
        "b1": torch.zeros(8, dtype=torch.float64),
        "w2": 0.5 * torch.randn(1, 8, generator=g, dtype=torch.float64),
    }

    def net(p, x):
        return torch.tanh(x @ p["w1"].T + p["b1"]) @ p["w2"].T

    def task(p):
        return ((net(p, X) - y) ** 2).mean()

    def test(p):
        return ((net(p, Xq) - yq) ** 2).mean()

    return theta, task, test


def test_imaml_meta_gradient_matches_dense_and_hypergradient():
    theta, task, test = imaml_task()
    lam = 2.0
    w = imaml.adapt(task, theta, lam, steps=3000, lr=0.1, momentum=0.9)
    grad, res = imaml.meta_gradient(task, test, w, lam)
    assert res.converged and set(grad) == set(theta)

    keys = list(theta)
    shapes = [theta[k].shape for k in keys]

    def unflat(z):
        out, o = {}, 0
        for k, s in zip(keys, shapes, strict=True):
            n = int(torch.Size(s).numel())
            out[k] = z[o : o + n].reshape(s)
            o += n
        return out

    z = torch.cat([w[k].reshape(-1) for k in keys])
    H = hessian(lambda z: task(unflat(z)))(z)
    g = jacrev(lambda z: test(unflat(z)))(z)
    dense = torch.linalg.solve(torch.eye(len(z), dtype=z.dtype) + H / lam, g)
    got = torch.cat([grad[k].reshape(-1) for k in keys])
    assert second.cosine_similarity(got, dense) >= COSINE_MIN
    assert rel(got, dense) <= REL_TOL[torch.float64]

    # the same thing through the general API: d test / d theta through the proximal problem
    hg = hypergradient(imaml.proximal(task, lam), lambda p, t: test(p), w, theta)
    assert rel(torch.cat([hg.grad[k].reshape(-1) for k in keys]), dense) <= REL_TOL[torch.float64]


def test_imaml_adapt_solves_the_proximal_problem():
    f = lambda w: ((w - 3.0) ** 2).sum()
    w = imaml.adapt(f, torch.zeros(3, dtype=torch.float64), lam=2.0, steps=300, lr=0.1)
    assert torch.allclose(w, torch.full((3,), 1.5, dtype=torch.float64))
    theta = (torch.zeros(2, requires_grad=True),)
    w = imaml.adapt(lambda p: (p[0] ** 2).sum(), theta, 1.0, steps=2)
    assert isinstance(w, tuple) and not w[0].requires_grad


def test_imaml_bad_arguments():
    f = lambda w: (w**2).sum()
    with pytest.raises(ValueError, match="lam"):
        imaml.proximal(f, 0.0)
    with pytest.raises(ValueError, match="lam"):
        imaml.meta_gradient(f, f, torch.zeros(2), -1.0)
    with pytest.raises(ValueError, match="momentum"):
        imaml.adapt(f, torch.zeros(2), 1.0, momentum=1.0)


# ----------------------------------------------------------------------------- examples (slow)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name, *args, timeout=900):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_weight_decay_example_lowers_validation_loss(tmp_path):
    out = run_example(
        "hyperparameter_weight_decay.py", "--outer-steps", "15", "--out", str(tmp_path / "wd.png")
    )
    line = next(ln for ln in out.splitlines() if ln.startswith("validation CE"))
    before, after = (float(t.rstrip(",")) for t in line.split()[2:5:2])
    assert after < 0.5 * before
    assert (tmp_path / "wd.png").stat().st_size > 0


@pytest.mark.slow
def test_imaml_example_beats_first_order_maml(tmp_path):
    out = run_example("imaml_sinusoid.py", "--quick", "--out", str(tmp_path / "imaml.png"))
    assert "(below first-order MAML)" in out
    assert (tmp_path / "imaml.png").stat().st_size > 0
