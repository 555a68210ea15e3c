"""Shared problems, references and tolerances of the Influence tests."""

from __future__ import annotations

import torch
from torch import nn

from second import exact_ggn, exact_hessian

# Tolerances (relative error of the whole score matrix unless stated).
SCORE_RTOL = {  # against a dense float64 solve
    "dense": 1e-10,
    "cg": 1e-7,
    "minres": 1e-7,
    "lowrank": 1e-8,  # rank = P: exact up to Lanczos accuracy
    "lissa": 2e-3,  # predicted truncation bias 1e-3 (LiSSA's default tol)
}
NEWTON_RTOL = 1e-8  # newton_loo vs a dense float64 reference (and iterative vs dense)

REG = 0.1


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(n, seed=1, d=3, classes=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def example_grads_loop(model, loss_fn, X, y):
    """Per-example gradients by plain autograd, one example at a time (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(X.shape[0]):
        loss = loss_fn(model(X[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def dense_curvature(model, loss_fn, X, y, kind):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(X)
    loss = loss_fn(out, y)
    if kind == "hessian":
        return exact_hessian(loss, params)
    if kind == "ggn":
        return exact_ggn(loss, out, params)
    G = example_grads_loop(model, loss_fn, X, y)
    return G.T @ G / X.shape[0]


def reference_scores(model, loss_fn, train, test, kind, shift):
    X, y = train
    H = dense_curvature(model, loss_fn, X, y, kind)
    A = H + shift * torch.eye(H.shape[0], dtype=H.dtype)
    Gtr = example_grads_loop(model, loss_fn, X, y)
    Gte = example_grads_loop(model, loss_fn, *test)
    return Gte @ torch.linalg.solve(A, Gtr.T) / X.shape[0], A, Gtr, Gte
