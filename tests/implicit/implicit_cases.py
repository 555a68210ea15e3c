"""Shared problems, references and tolerances of the implicit-differentiation tests."""

from __future__ import annotations

import torch
from torch.func import hessian, jacrev

import second

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
