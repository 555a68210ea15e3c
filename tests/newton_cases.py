"""Shared problems and tolerances of the Newton-type optimizer and trust-region tests."""

from __future__ import annotations

import math

import torch

DT = torch.float64


# Tolerances. Loosening one is a visible, commented change.
EXACT = dict(rtol=1e-9, atol=1e-10)  # float64 quantities that are exact up to round-off


SOLUTION_TOL = 1e-8  # max abs error of a converged optimizer's solution


NORM_TOL = 1e-10  # |  ||p|| - radius |  for a step on the boundary


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


def rosen_residual(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def contract(opt, loss_fn):
    """torch.optim's closure around ``loss_fn``: zero the gradients, loss, backward, return."""

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


class ResidualModel(torch.nn.Module):
    """The residual ``r(x)`` as a model of its parameter ``x``, for optimizers built from a model.

    ``GaussNewton(model)`` reads the output ``r`` of the last forward call in the closure.
    """

    def __init__(self, residual, x0):
        super().__init__()
        self.residual = residual
        self.x = torch.nn.Parameter(torch.as_tensor(x0, dtype=DT).clone())

    def forward(self):
        return self.residual(self.x)


def least_squares_closure(opt, model):
    """torch.optim's closure on ``0.5 ||r(x)||^2`` with ``r = model()``."""
    return contract(opt, lambda: 0.5 * model().square().sum())
