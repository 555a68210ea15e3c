"""second.optim.LiSSA (optim/lissa.py)."""

from __future__ import annotations

import torch

from newton_cases import DT
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
    assert st["matvecs"] >= 4 * 150 * 2 and st["scale"] > 0
