"""The diagonal curvature estimators against closed forms and dense float64 references.

Hutchinson's :math:`z \\odot Hz` is unbiased for the Hessian diagonal (exactly, averaged over
all sign vectors; statistically, over draws); Gauss-Newton-Bartlett's :math:`\\hat g \\odot \\hat g`
is unbiased for the GGN diagonal (and differs from the Hessian's on a nonlinear model).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import second
from second.optim._diagonal import gnb_diagonal, hutchinson_diagonal, rademacher

N_DRAWS = 4000
SIGMAS = 5.0  # the tolerance of a Monte-Carlo mean, in standard errors


def _quadratic():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = B + B.T
    x = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * x @ A @ x + torch.sin(x).sum() * 0  # the Hessian is A
    (grad,) = torch.autograd.grad(loss, [x], create_graph=True)
    return A, x, grad


def test_hutchinson_is_z_times_hz_and_exactly_unbiased_over_all_signs():
    A, x, grad = _quadratic()
    gen = torch.Generator().manual_seed(3)
    (est,) = hutchinson_diagonal([grad], [x], gen)
    z = rademacher(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(est, z * (A @ z), rtol=1e-12, atol=1e-12)
    mean = (
        sum(
            torch.tensor(s, dtype=torch.float64) * (A @ torch.tensor(s, dtype=torch.float64))
            for s in itertools.product((-1.0, 1.0), repeat=4)
        )
        / 16
    )
    torch.testing.assert_close(mean, A.diagonal(), rtol=1e-12, atol=1e-12)


def test_hutchinson_mean_over_draws():
    A, x, grad = _quadratic()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([hutchinson_diagonal([grad], [x], gen)[0] for _ in range(N_DRAWS)])
    se = draws.std(0) / N_DRAWS**0.5
    assert ((draws.mean(0) - A.diagonal()).abs() <= SIGMAS * se + 1e-12).all()
    assert (draws.std(0) > 0).any()  # off-diagonal A: the estimate is random, not exact


@pytest.mark.parametrize(
    ("loss_fn", "target"),
    [(nn.CrossEntropyLoss(), "class"), (nn.MSELoss(reduction="sum"), "real")],
    ids=["ce-mean", "mse-sum"],
)
def test_gnb_is_unbiased_for_the_ggn_diagonal(loss_fn, target):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    params = list(net.parameters())
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,)) if target == "class" else torch.randn(5, 3, dtype=torch.float64)
    f = net(X)
    loss = loss_fn(f, y)
    ggn = second.exact_ggn(loss, f, params).diagonal()
    hess = second.exact_hessian(loss_fn(net(X), y), params).diagonal()
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            torch.cat([e.reshape(-1) for e in gnb_diagonal(f, loss_fn, params, gen)])
            for _ in range(N_DRAWS)
        ]
    )
    se = draws.std(0) / N_DRAWS**0.5
    assert ((draws.mean(0) - ggn).abs() <= SIGMAS * se + 1e-10).all()
    assert ((draws.mean(0) - hess).abs() > SIGMAS * se + 1e-10).any()  # not the Hessian's
