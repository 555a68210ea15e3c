"""second.optim.LiSSA (optim/lissa.py)."""

from __future__ import annotations

import torch

from newton_cases import DT, contract
from second.optim import (
    LiSSA,
)


def convex_problem(n=256, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    w_true = torch.arange(1.0, d + 1, dtype=DT)
    y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=DT)
    w_star = torch.linalg.lstsq(X, y).solution
    return X, y, w_star


LISSA_STOCHASTIC_TOL = 5e-2  # relative error of the stochastic LiSSA-Newton solution


def test_lissa_deterministic_is_newton_on_a_quadratic():
    X, y, w_star = convex_problem()
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = LiSSA([w], depth=400)
    for _ in range(3):
        opt.step(contract(opt, lambda: ((X @ w - y) ** 2).mean()))
    torch.testing.assert_close(w.detach(), w_star, rtol=0, atol=1e-6)


def test_lissa_stochastic_converges_near_the_solution():
    X, y, w_star = convex_problem()
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    opt = LiSSA([w], depth=150, repeats=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randint(0, 256, (64,), generator=gen)
        opt.step(
            contract(opt, lambda: ((X @ w - y) ** 2).mean()),
            contract(opt, lambda idx=idx: ((X[idx] @ w - y[idx]) ** 2).mean()),
        )
    err = float((w.detach() - w_star).norm() / w_star.norm())
    assert err < LISSA_STOCHASTIC_TOL
    st = opt.state[w]
    assert st["matvecs"] >= 4 * 150 * 2 and st["scale"] > 0


LISSA_SHARED_TOL = 1e-12  # float64: the same recursion, different call paths


def test_lissa_step_is_the_solvers_recursion_on_the_dense_hessian():
    """One optimizer step equals lr times second.solvers' recursion on the dense Hessian."""
    from second.solvers._lissa import lissa_recursion

    X, y, _ = convex_problem()
    w = torch.zeros(5, dtype=DT, requires_grad=True)
    H = 2 * X.T @ X / X.shape[0]
    g = -2 * X.T @ y / X.shape[0]
    s, depth, lam = 1.7 * float(torch.linalg.eigvalsh(H)[-1]), 7, 0.3
    expected = lissa_recursion(g, lambda v: H @ v, depth=depth, scale=s, damping=lam).x
    # the truncated series by hand: (1/s) sum_{i<=depth} (I - (H + lam I)/s)^i g
    M = torch.eye(5, dtype=DT) - (H + lam * torch.eye(5, dtype=DT)) / s
    by_hand = sum(torch.linalg.matrix_power(M, i) @ g for i in range(depth + 1)) / s
    torch.testing.assert_close(expected, by_hand, rtol=LISSA_SHARED_TOL, atol=LISSA_SHARED_TOL)
    opt = LiSSA([w], depth=depth, scale=s, damping=lam, lr=0.5)

    def closure():
        opt.zero_grad()
        loss = ((X @ w - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(
        w.detach(), -0.5 * expected, rtol=LISSA_SHARED_TOL, atol=LISSA_SHARED_TOL
    )
