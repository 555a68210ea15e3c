"""Shared cases of the preconditioned optimizers (SOAP, Shampoo, Sophia, SophiaH, AdaHessian).

Each case builds a small float64 model, its loss and an optimizer from keyword options;
the helpers run torch.optim's closure contract on fixed batches.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import second.optim as so


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batch(seed: int = 1, n: int = 24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


LOSS = nn.CrossEntropyLoss()


def build(name: str, net: nn.Module, params=None, **kw):
    """The optimizer ``name`` on ``net`` (or on ``params``: parameter groups)."""
    if name == "Sophia":
        return so.Sophia(net, LOSS, params=params, **kw)
    cls = getattr(so, name)
    return cls(net.parameters() if params is None else params, **kw)


#: every optimizer with options that move the tiny model quickly
OPTIONS = {
    "SOAP": dict(lr=0.05, precondition_frequency=2),
    "Shampoo": dict(lr=0.05, precondition_frequency=2),
    "Sophia": dict(lr=0.05, update_period=2),
    "SophiaH": dict(lr=0.05, update_period=2),
    "AdaHessian": dict(lr=0.1),
}
NAMES = list(OPTIONS)


def closure_for(opt, net, X, y):
    def closure():
        opt.zero_grad()
        loss = LOSS(net(X), y)
        loss.backward()
        return loss

    return closure


def run(opt, net, steps: int, seed0: int = 0) -> list[float]:
    """``steps`` steps on batches ``seed0 + k``; the losses."""
    out = []
    for k in range(steps):
        X, y = batch(seed0 + k)
        out.append(float(opt.step(closure_for(opt, net, X, y)).detach()))
    return out


def snapshot(opt, net):
    """Deep copies of the parameters and the optimizer state."""
    return [p.detach().clone() for p in net.parameters()], copy.deepcopy(opt.state_dict())
