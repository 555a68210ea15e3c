"""Influence.newton_loo (influence/_loo.py) against dense float64 references and leave-one-out
retraining; with losses whose backward torch cannot differentiate forward-mode."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import second
from dense_reference import ref_ggn, ref_hessian, ref_per_example_gradients
from influence_cases import NEWTON_RTOL, data, mlp, rel
from second import Influence, exact_hessian

# Tolerances: relative error of the whole result against a dense float64 reference (NEWTON_RTOL
# in influence_cases), correlation and slope against exact leave-one-out retraining.
REGRESSION_NEWTON_RTOL = 1e-9  # the regression losses
LOO_PEARSON = {"scores": 0.99, "newton_loo": 0.999}  # small logistic regression, exact LOO
LOO_SLOPE_NEWTON = (0.97, 1.03)  # actual / predicted for newton_loo
DAMPING = 2.0  # keeps every leave-one-out curvature positive definite (no fallback)


def regression_newton_reference(model, loss_fn, train, test, idx, kind):
    """``g_t . d + 1/2 d^T H_t d`` with ``d = (C + damping I - C_j / n)^{-1} g_j / n``."""
    X, y = train
    n = X.shape[0]
    curv = ref_hessian if kind == "hessian" else ref_ggn
    A = curv(model, loss_fn, X, y) + DAMPING * torch.eye(sum(p.numel() for p in model.parameters()))
    Gt = ref_per_example_gradients(model, loss_fn, *test)
    out = torch.zeros(test[0].shape[0], len(idx), dtype=torch.float64)
    for k, j in enumerate(idx):
        one = (X[j : j + 1], y[j : j + 1])
        g = ref_per_example_gradients(model, loss_fn, *one)[0]
        d = torch.linalg.solve(A - curv(model, loss_fn, *one) / n, g / n)
        for i in range(test[0].shape[0]):
            Ht = ref_hessian(model, loss_fn, test[0][i : i + 1], test[1][i : i + 1])
            out[i, k] = Gt[i] @ d + 0.5 * d @ Ht @ d
    return out


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.HuberLoss(delta=0.5)], ids=["mse", "huber"])
@pytest.mark.parametrize("kind", ["hessian", "ggn"])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_newton_loo_with_regression_losses_matches_dense_reference(loss_fn, kind, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randn(16, 2, generator=g, dtype=torch.float64)
    test, idx = (X[:2] + 0.1, y[:2]), [0, 5, 11]
    ref = regression_newton_reference(model, loss_fn, (X, y), test, idx, kind)
    inf = Influence(model, loss_fn, (X, y), curvature=kind, method=method, damping=DAMPING)
    assert rel(inf.newton_loo(test, idx), ref) < REGRESSION_NEWTON_RTOL


def test_newton_loo_with_mse_and_kfac_equals_the_ggn_of_a_linear_regression():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(30, 3, dtype=torch.float64), torch.randn(30, 1, dtype=torch.float64)
    kfac = Influence(model, nn.MSELoss(), (X, y), curvature="kfac", damping=DAMPING)
    exact = Influence(model, nn.MSELoss(), (X, y), curvature="ggn", damping=DAMPING)
    # K-FAC is exact for a one-output linear regression
    assert (
        rel(kfac.newton_loo((X[:2], y[:2]), [1, 4]), exact.newton_loo((X[:2], y[:2]), [1, 4]))
        < REGRESSION_NEWTON_RTOL
    )


def newton_reference(model, loss_fn, train, test, idx, shift):
    X, y = train
    n = X.shape[0]
    params = list(model.parameters())
    H = exact_hessian(loss_fn(model(X), y), params) + shift * torch.eye(
        sum(p.numel() for p in params), dtype=torch.float64
    )
    out = torch.zeros(test[0].shape[0], len(idx), dtype=torch.float64)
    for k, j in enumerate(idx):
        lj = loss_fn(model(X[j : j + 1]), y[j : j + 1])
        Hj = exact_hessian(lj, params)
        gj = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lj, params)])
        d = torch.linalg.solve(H - Hj / n, gj / n)
        for i in range(test[0].shape[0]):
            lt = loss_fn(model(test[0][i : i + 1]), test[1][i : i + 1])
            gt = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lt, params)])
            Ht = exact_hessian(loss_fn(model(test[0][i : i + 1]), test[1][i : i + 1]), params)
            out[i, k] = gt @ d + 0.5 * d @ Ht @ d
    return out


@pytest.mark.parametrize("method", ["dense", "minres"])
def test_newton_loo_matches_dense_reference(method):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(16), data(2, seed=2)
    idx = [0, 5, 11]
    ref = newton_reference(model, loss_fn, train, test, idx, 1.0)
    inf = Influence(model, loss_fn, train, method=method, damping=1.0, progressbar=False)
    est = inf.newton_loo(test, torch.tensor(idx))
    assert est.shape == (2, 3)
    assert rel(est, ref) < NEWTON_RTOL


@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_newton_loo_of_a_type2_or_mc_fisher_removes_the_examples_ggn_term(fisher):
    """The leave-one-out curvature drops the example's own term of the matrix: for the type-2
    Fisher (equal to the GGN) and the Monte-Carlo one (whose expectation it is) that term is
    the example's GGN, not its empirical Fisher (the outer product of its gradient)."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(16), data(2, seed=2)
    idx = torch.tensor([0, 5, 11])
    ggn = Influence(model, loss_fn, train, curvature="ggn", damping=1.0, progressbar=False)
    ref = ggn.newton_loo(test, idx)
    opts = {"fisher": fisher}
    if fisher == "mc":  # many samples: the MC Fisher near its expectation, the GGN
        opts.update(mc_samples=4000, generator=torch.Generator().manual_seed(0))
    inf = Influence(
        model,
        loss_fn,
        train,
        curvature="fisher",
        curvature_options=opts,
        damping=1.0,
        progressbar=False,
    )
    # MC: the 4,000-sample Fisher itself differs from the GGN (1.3e-3 here); the example's
    # empirical-Fisher term, the old mistake, puts it 8e-2 off
    tol = NEWTON_RTOL if fisher == "type2" else 1e-2
    assert rel(inf.newton_loo(test, idx), ref) < tol


def test_newton_loo_falls_back_when_leave_one_out_curvature_is_indefinite():
    # one parameter, per-example loss cos(w x y) with curvature -(x y)^2 cos(w x y): point 0
    # carries all the positive curvature, so removing it leaves H - H_0 / n < 0
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    X = torch.ones(3, 1, dtype=torch.float64)
    y = torch.tensor([[math.pi], [0.5], [0.4]], dtype=torch.float64)

    def loss_fn(out, t):
        return torch.cos(out * t).mean()

    inf = second.Influence(
        model, loss_fn, (X, y), curvature="hessian", method="dense", progressbar=False
    )
    with pytest.warns(second.NegativeCurvatureWarning, match=r"point\(s\) \[0\]"):
        est = inf.newton_loo((X[1:2], y[1:2]), [0, 1, 2])
    assert torch.isfinite(est).all()
    # the positive-definite points still get the Newton step: it differs from first order
    first = inf.scores((X[1:2], y[1:2]))
    assert not torch.allclose(est[0, 1:], first[0, 1:])


def _fit_logistic(X, y, weights, lam, theta0, tol=1e-12):
    """Newton on w-weighted mean logistic loss + lam/2 ||theta||^2 (theta = [w, b])."""
    n = X.shape[0]
    Xa = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1)
    theta = theta0.clone()
    for _ in range(100):
        p = torch.sigmoid(Xa @ theta)
        g = Xa.T @ (weights * (p - y)) / n + lam * theta
        if float(g.norm()) < tol:
            break
        H = (Xa.T * (weights * p * (1 - p))) @ Xa / n + lam * torch.eye(Xa.shape[1], dtype=X.dtype)
        theta = theta - torch.linalg.solve(H, g)
    return theta


def test_leave_one_out_logistic_regression():
    g = torch.Generator().manual_seed(3)
    n, d, lam = 60, 3, 1e-2
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (
        X @ torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
        + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
        > 0
    ).double()
    Xt = torch.randn(1, d, generator=g, dtype=torch.float64)
    yt = torch.tensor([1.0], dtype=torch.float64)
    theta = _fit_logistic(
        X, y, torch.ones(n, dtype=torch.float64), lam, torch.zeros(d + 1, dtype=torch.float64)
    )
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d].reshape(1, d))
        model.bias.copy_(theta[d:])

    class Squeeze(nn.Module):
        def forward(self, out, target):
            return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), target)

    loss_fn = Squeeze()
    inf = Influence(model, loss_fn, (X, y), damping=lam, progressbar=False)

    def test_loss(th):
        z = torch.cat([Xt, torch.ones(1, 1, dtype=X.dtype)], 1) @ th
        return float(nn.functional.binary_cross_entropy_with_logits(z, yt))

    base = test_loss(theta)
    actual = []
    for j in range(n):
        w = torch.ones(n, dtype=torch.float64)
        w[j] = 0
        actual.append(test_loss(_fit_logistic(X, y, w, lam, theta)) - base)
    actual = torch.tensor(actual, dtype=torch.float64)
    first = inf.scores((Xt, yt))[0]
    newton = inf.newton_loo((Xt, yt), range(n))[0]
    assert float(torch.corrcoef(torch.stack([first, actual]))[0, 1]) > LOO_PEARSON["scores"]
    assert float(torch.corrcoef(torch.stack([newton, actual]))[0, 1]) > LOO_PEARSON["newton_loo"]
    slope = float(actual @ newton / (newton @ newton))
    assert LOO_SLOPE_NEWTON[0] < slope < LOO_SLOPE_NEWTON[1]
    assert float((newton - actual).abs().max()) < float((first - actual).abs().max())
