"""second.implicit_root and stationary (implicit/_root.py) against dense implicit-function answers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import hessian, jacrev

from implicit_cases import (
    REL_TOL,
    newton,
    rel,
    ridge,
)
from second import ConvergenceWarning, implicit_root
from second.implicit import stationary


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


# ----------------------------------------------------------------------------- second derivatives
def _hessian_by_rows(grad, h):
    rows = [torch.autograd.grad(grad[i], h, retain_graph=True)[0] for i in range(h.numel())]
    return torch.stack(rows)


@pytest.mark.parametrize("case", ["through w only", "linear in w", "direct and mixed"])
def test_implicit_root_second_derivatives_match_unrolled_newton(case):
    # create_graph=True used to drop the implicit part of the Hessian silently (no graph on
    # the implicit gradient); "linear in w" has a constant cotangent, the case that a
    # once_differentiable guard would miss too
    inner, A, B = coupled_quadratic()

    def inner_flat(z, h):
        return inner((z[:2], z[2:].reshape(2, 2)), h)

    @implicit_root(stationary(inner))
    def solver(h):
        z = newton(inner_flat, torch.zeros(6, dtype=torch.float64), h)
        return (z[:2].clone(), z[2:].reshape(2, 2).clone())

    c = torch.arange(1.0, 7.0, dtype=torch.float64)
    loss = {
        "through w only": lambda a, b, h: (a * c[:2]).sum() + (b.reshape(-1) * c[2:]).sum() ** 2,
        "linear in w": lambda a, b, h: a.sum() + b.sum(),
        "direct and mixed": lambda a, b, h: (
            (a**2).sum() * h.sum() + (b * h[:2]).sum() + h.pow(3).sum()
        ),
    }[case]

    def unrolled(h):  # Newton to machine precision, differentiated through its iterations
        z = newton(inner_flat, torch.zeros(6, dtype=torch.float64), h, iters=12)
        return loss(z[:2], z[2:].reshape(2, 2), h)

    h0 = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    expected = hessian(unrolled)(h0)
    h = h0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(*solver(h), h), h, create_graph=True)
    assert grad.requires_grad
    assert rel(grad.detach(), jacrev(unrolled)(h0)) <= REL_TOL[torch.float64]
    assert rel(_hessian_by_rows(grad, h), expected) <= REL_TOL[torch.float64]


def test_implicit_root_second_derivative_of_a_quadratic_and_gradgradcheck():
    # the review's case: w* = A^-1 h, L = |w*|^2 sum(h) + sum(h^3); got [[6.6,-0.8],[0.6,-3.8]]
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    @implicit_root(stationary(lambda w, h: 0.5 * w @ A @ w - h @ w))
    def solve_inner(h):
        return torch.linalg.solve(A, h)

    def outer(w, h):
        return (w**2).sum() * h.sum() + (h**3).sum()

    h = torch.tensor([1.0, -0.5], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(outer(solve_inner(h), h), h, create_graph=True)
    expected = hessian(lambda h: outer(torch.linalg.solve(A, h), h))(h.detach())
    assert torch.allclose(expected, torch.tensor([[7.4, -0.4], [-0.4, -4.2]], dtype=torch.float64))
    assert rel(_hessian_by_rows(grad, h), expected) <= REL_TOL[torch.float64]
    assert torch.autograd.gradgradcheck(solve_inner, (h,))


def test_implicit_root_second_derivatives_nonsymmetric_fixed_point():
    g = torch.Generator().manual_seed(7)
    W = 0.3 * torch.randn(4, 4, generator=g, dtype=torch.float64)

    def iterate(h, n):
        x = torch.zeros(4, dtype=torch.float64)
        for _ in range(n):
            x = torch.tanh(W @ x + h)
        return x

    fixed_point = implicit_root(lambda x, h: x - torch.tanh(W @ x + h), symmetric=False)(
        lambda h: iterate(h, 200)
    )

    def loss(x, h):
        return (x**3).sum() + (x * h).sum()

    h0 = torch.tensor([0.1, 0.2, -0.3, 0.4], dtype=torch.float64)
    expected = hessian(lambda h: loss(iterate(h, 100), h))(h0)  # contraction: converged
    h = h0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(fixed_point(h), h), h, create_graph=True)
    assert rel(_hessian_by_rows(grad, h), expected) <= REL_TOL[torch.float64]


# ----------------------------------------------------------------------------- arguments
def test_implicit_root_nested_arguments_get_gradients():
    # tensors two levels deep ({"reg": (a, l)}) used to get no gradient (.grad None)
    def inner(w, s, hp):
        a, lam = hp["reg"]
        return 0.5 * ((w - a) ** 2).sum() + 0.5 * (lam + s) * (w**2).sum()

    @implicit_root(stationary(inner))
    def solver(s, hp):
        a, lam = hp["reg"]
        return a / (1 + lam + s)

    a = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    (solver(s, {"reg": [a, lam], "name": "ridge"}) ** 2).sum().backward()

    def closed(s, a, lam):
        return ((a / (1 + lam + s)) ** 2).sum()

    expected = torch.func.grad(closed, argnums=(0, 1, 2))(s.detach(), a.detach(), lam.detach())
    for got, exp in zip((s.grad, a.grad, lam.grad), expected, strict=True):
        assert got is not None and rel(got, exp) <= REL_TOL[torch.float64]

    # only nested tensors require grad: the output still has a graph
    a2 = a.detach().clone().requires_grad_(True)
    w = solver(torch.tensor(0.1, dtype=torch.float64), {"reg": (a2, lam.detach())})
    assert w.requires_grad
    (w**2).sum().backward()
    assert rel(a2.grad, expected[1]) <= REL_TOL[torch.float64]


def test_implicit_root_negative_damping_is_refused():
    F = stationary(lambda w, h: 0.5 * ((w - h) ** 2).sum())
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            implicit_root(F, damping=bad)


# ----------------------------------------------------------------------------- root check
def _quartic_problem(scale=1.0):
    A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)

    def inner(w, h):
        return scale * (0.5 * w @ A @ w - h @ w + 0.25 * (w**4).sum())

    def gd(h, steps):  # plain gradient descent: 3 steps are far from the optimum
        w = torch.zeros(2, dtype=torch.float64)
        for _ in range(steps):
            w = w - 0.1 / scale * torch.func.grad(inner)(w, h)
        return w

    return inner, gd


@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_implicit_root_warns_when_the_output_is_not_a_root(scale):
    # ||F(w)|| = 0.81 after 3 steps (8.1e-7 with the loss scaled by 1e-6): the gradient was
    # silently wrong; the check is relative (Newton step vs ||w||), so the scale is irrelevant
    inner, gd = _quartic_problem(scale)
    h0 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    few = implicit_root(stationary(inner))(lambda h: gd(h, 3))
    h = h0.clone().requires_grad_(True)
    with pytest.warns(ConvergenceWarning, match="implicit_root: the solver's output is not a root"):
        (few(h) ** 2).sum().backward()
    for quiet in (dict(inner_tol=None), dict(warn=False)):
        silent = implicit_root(stationary(inner), **quiet)(lambda h: gd(h, 3))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            (silent(h0.clone().requires_grad_(True)) ** 2).sum().backward()

    # at the root: no warning, and the gradient of the dense implicit function theorem
    def inner_scaled_back(w, h):
        return inner(w, h) / scale

    exact = implicit_root(stationary(inner))(lambda h: newton(inner_scaled_back, gd(h, 0), h))
    h = h0.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        w = exact(h)
        (w**2).sum().backward()
    H = hessian(inner_scaled_back)(w.detach(), h0)
    C = jacrev(jacrev(inner_scaled_back, argnums=0), argnums=1)(w.detach(), h0)
    expected = -C.T @ torch.linalg.solve(H, 2 * w.detach())
    assert rel(h.grad, expected) <= REL_TOL[torch.float64]


def test_implicit_root_root_check_nonsymmetric():
    W = torch.tensor([[0.2, -0.3], [0.1, 0.25]], dtype=torch.float64)

    def F(x, h):
        return x - torch.tanh(W @ x + h)

    def iterate(h, n):
        x = torch.zeros(2, dtype=torch.float64)
        for _ in range(n):
            x = torch.tanh(W @ x + h)
        return x

    h0 = torch.tensor([0.5, -0.4], dtype=torch.float64)
    early = implicit_root(F, symmetric=False)(lambda h: iterate(h, 2))
    with pytest.warns(ConvergenceWarning, match="not a root"):
        early(h0.clone().requires_grad_(True)).sum().backward()
    done = implicit_root(F, symmetric=False)(lambda h: iterate(h, 200))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        done(h0.clone().requires_grad_(True)).sum().backward()
