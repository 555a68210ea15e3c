"""second.optim.HessianFree (optim/hessian_free.py)."""

from __future__ import annotations

import pytest
import torch

from newton_cases import DT
from second.optim import (
    HessianFree,
)


def small_regression(seed=0):
    torch.manual_seed(seed)
    X = torch.randn(128, 4, dtype=DT)
    y = torch.sin(X.sum(1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(
        DT
    )

    def closure(n=128):
        def c():  # torch.optim's contract; HessianFree(model) reads the output from a hook
            model.zero_grad()
            loss = torch.nn.functional.mse_loss(model(X[:n]), y[:n])
            loss.backward()
            return loss

        return c

    return model, closure


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_hessian_free_decreases_the_loss(curvature):
    model, closure = small_regression()
    opt = HessianFree(model, curvature=curvature, damping=1.0)
    first = float(opt.step(closure(), curvature_closure=closure(32)))
    for _ in range(15):
        last = float(opt.step(closure(), curvature_closure=closure(32)))
    assert last < 0.5 * first
    st = opt.state[next(iter(model.parameters()))]
    assert st["matvecs"] > 0 and st["direction"].shape == (
        sum(p.numel() for p in model.parameters()),
    )
    assert all(h["loss"] <= first + 1e-12 for h in opt.history)


def test_hessian_free_damping_rises_when_the_model_is_poor():
    model, closure = small_regression()
    opt = HessianFree(model, damping=1e-6, cg_maxiter=100)
    dampings = []
    for _ in range(6):
        opt.step(closure(), curvature_closure=closure(8))  # tiny curvature batch: poor model
        dampings.append(opt.history[-1])
    rhos = [h["rho"] for h in dampings]
    damp = [h["damping"] for h in dampings]
    poor = [i for i in range(1, len(damp)) if rhos[i] < 0.25]
    assert poor, f"no poor step to check (rho = {rhos}): the test checks nothing"
    for i in poor:
        assert damp[i] > damp[i - 1]
