"""Shared cases for the Laplace tests: small float64 models and data, dense references, tolerances."""

from __future__ import annotations

import torch
from torch import nn

from second import exact_ggn, exact_hessian

# named tolerances (float64 throughout)
EXACT = 1e-9  # the same algebra done two ways
ITERATIVE = 1e-6  # eigsh / optimisers stopped at a tolerance


def _mlp(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).double()


def _cls_data(n=30, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (n,), generator=g
    )


def _reg_data(n=30, out=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, dtype=torch.float64, generator=g)
    return X, torch.randn(n, out, dtype=torch.float64, generator=g)


def _dense_curvature(model, X, y, params, likelihood, curvature="ggn"):
    """The curvature of the summed NLL (sigma = 1), dense."""
    out = model(X)
    if likelihood == "classification":
        loss = nn.functional.cross_entropy(out, y, reduction="sum")
    else:
        loss = 0.5 * ((out - y) ** 2).sum()
    if curvature == "hessian":
        return exact_hessian(loss, params)
    return exact_ggn(loss, out, params)


def _dense_lml(H, theta, delta_vec, loglik, c=1.0):
    Lam = c * H + torch.diag(delta_vec)
    logdet_ratio = torch.logdet(Lam) - torch.log(delta_vec).sum()
    return loglik - 0.5 * (logdet_ratio + (delta_vec * theta**2).sum())


def _flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def _cls_loglik(model, X, y):
    return -float(nn.functional.cross_entropy(model(X), y, reduction="sum").detach())
