"""Laplace's log marginal likelihood and its optimum over the prior (laplace/_marglik.py)
against dense float64 computations and grid searches."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from laplace_cases import EXACT, _cls_data, _dense_curvature, _dense_lml, _flat, _mlp, _reg_data
from second.laplace import Laplace


def test_regression_lml_with_noise_and_temperature():
    model = _mlp(out=2)
    X, y = _reg_data()
    sigma, T = 0.7, 2.0
    la = Laplace(model, nn.MSELoss(), (X, y), sigma_noise=sigma, temperature=T, subset="all")
    params = list(model.parameters())
    H = _dense_curvature(model, X, y, params, "regression")
    sse = float(((model(X) - y) ** 2).sum().detach())
    c = 1.0 / (sigma**2 * T)
    loglik = -c * 0.5 * sse - X.shape[0] * 2 * math.log(sigma * math.sqrt(2 * math.pi))
    dvec = torch.full((H.shape[0],), 2.0, dtype=torch.float64)
    ref = _dense_lml(H, _flat(params), dvec, loglik, c=c)
    assert torch.allclose(la.log_marginal_likelihood(2.0), ref, rtol=EXACT)


def _grid_optimum(la, fit_sigma=False):
    deltas = torch.logspace(-3, 3, 301 if fit_sigma else 601, dtype=torch.float64)
    best = (-math.inf, None, None)
    sigmas = torch.logspace(-1.5, 0.5, 41, dtype=torch.float64) if fit_sigma else [None]
    for s in sigmas:
        vals = torch.stack([la.log_marginal_likelihood(d, s) for d in deltas])
        i = int(vals.argmax())
        if float(vals[i]) > best[0]:
            best = (float(vals[i]), float(deltas[i]), s)
    return best


@pytest.mark.parametrize("method", ["mackay", "gradient"])
@pytest.mark.parametrize("structure", ["full", "kfac"])
def test_prior_optimum_matches_grid_search(method, structure):
    model = _mlp()
    X, y = _cls_data()
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure=structure, subset="all")
    lml, delta, _ = _grid_optimum(la)
    res = la.optimize_prior_precision(method)
    assert res.converged
    step = 10 ** (6 / 600)  # the grid's ratio between neighbours
    assert delta / step <= float(res.prior_precision) <= delta * step
    assert res.log_marginal_likelihood >= lml - 1e-9


def test_mackay_and_gradient_agree_per_group_and_with_noise():
    model = _mlp(out=2)
    X, y = _reg_data()
    la = Laplace(model, nn.MSELoss(), (X, y), subset="all")
    a = la.optimize_prior_precision("mackay", per_group=True)
    b = la.optimize_prior_precision("gradient", per_group=True)
    assert a.converged and b.converged
    assert a.prior_precision.shape == (2,)
    assert torch.allclose(a.prior_precision, b.prior_precision, rtol=1e-5)
    assert abs(a.sigma_noise - b.sigma_noise) <= 1e-5 * a.sigma_noise
    # a stationary point: the gradient of the LML vanishes there
    d = a.prior_precision.clone().requires_grad_(True)
    s = torch.tensor(a.sigma_noise, dtype=torch.float64, requires_grad=True)
    (gd, gs) = torch.autograd.grad(la.log_marginal_likelihood(d, s), (d, s))
    assert float(gd.abs().max()) < 1e-6 and abs(float(gs)) < 1e-5


def test_regression_noise_optimum_matches_grid():
    model = _mlp(out=2)
    X, y = _reg_data()
    la = Laplace(model, nn.MSELoss(), (X, y), subset="last_layer")
    lml, delta, sigma = _grid_optimum(la, fit_sigma=True)
    res = la.optimize_prior_precision()
    assert res.log_marginal_likelihood >= lml - 1e-9
    assert abs(res.sigma_noise / float(sigma) - 1) < 0.06  # half the sigma grid's spacing (12%)


def test_an_unconverged_prior_optimisation_warns_and_a_converged_one_does_not():
    from second import ConvergenceWarning

    model = _mlp(out=2)
    X, y = _reg_data()
    for method in ("mackay", "gradient"):
        la = Laplace(model, nn.MSELoss(), (X, y), subset="all", prior_precision=1e4)
        with pytest.warns(ConvergenceWarning, match="did not converge"):
            result = la.optimize_prior_precision(method, maxiter=2)
        assert not result.converged
        la = Laplace(_mlp(), nn.CrossEntropyLoss(), _cls_data(), subset="all")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert la.optimize_prior_precision(method).converged
