"""second.implicit_root and stationary (implicit/_root.py) against dense implicit-function answers."""

from __future__ import annotations

import torch
from torch.func import hessian, jacrev

from implicit_cases import (
    REL_TOL,
    newton,
    rel,
    ridge,
)
from second import implicit_root
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
