"""OnlinePrior (laplace/_online.py) against the marginal likelihood's optimum."""

from __future__ import annotations

import torch
from torch import nn

from laplace_cases import _cls_data, _mlp
from second.laplace import Laplace


def test_online_prior_hook_tracks_the_marginal_likelihood_optimum():
    from second.laplace import OnlinePrior

    model = _mlp()
    X, y = _cls_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    prior = OnlinePrior(
        opt, model, nn.CrossEntropyLoss(), (X, y), every=4, burnin=2, maxiter=200, per_group=True
    )
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y) + prior.penalty() / 30
        loss.backward()
        opt.step()
    assert [h[0] for h in prior.history] == [6, 10]  # after burn-in, every 4 steps
    # the last update is the optimum at the parameters of step 10
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure="kfac", subset="all")
    res = la.optimize_prior_precision(per_group=True, maxiter=200)
    assert torch.allclose(prior.prior_precision, res.prior_precision, rtol=1e-6)
    # the penalty is the negative log prior
    theta = [p.detach() for p in model.parameters()]
    d = prior.prior_precision
    ref = 0.5 * (d[0] * (theta[0] ** 2).sum() + d[0] * (theta[1] ** 2).sum())
    ref = ref + 0.5 * d[1] * ((theta[2] ** 2).sum() + (theta[3] ** 2).sum())
    assert torch.allclose(prior.penalty().detach(), ref)
    prior.remove()
    opt.step()
    assert prior.steps == 10
