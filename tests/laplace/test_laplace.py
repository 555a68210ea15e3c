"""second.laplace.Laplace against dense float64 computations on small models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace_cases import EXACT, _cls_data, _cls_loglik, _dense_curvature, _dense_lml, _flat, _mlp
from second.laplace import Laplace


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
@pytest.mark.parametrize("subset", ["all", "last_layer", "params"])
def test_full_lml_and_logdet_match_dense(subset, curvature):
    model = _mlp()
    X, y = _cls_data()
    if subset == "params":
        sel = [model[0].weight, model[2].bias]
        params, arg = sel, sel
    else:
        params = list(model.parameters()) if subset == "all" else list(model[2].parameters())
        arg = subset
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset=arg, curvature=curvature)
    H = _dense_curvature(model, X, y, params, "classification", curvature)
    delta = 3.0 if curvature == "ggn" else 30.0  # the Hessian needs a prior that makes it PD
    dvec = torch.full((H.shape[0],), delta, dtype=torch.float64)
    ref = _dense_lml(H, _flat(params), dvec, _cls_loglik(model, X, y))
    assert torch.allclose(la.log_marginal_likelihood(delta), ref, rtol=EXACT, atol=0)
    ld = la.log_det_posterior_precision(delta)
    assert torch.allclose(ld, torch.logdet(H + torch.diag(dvec)), rtol=EXACT)


def test_per_group_prior_matches_dense():
    model = _mlp()
    X, y = _cls_data()
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="all")
    assert la.groups == ["0", "2"]
    delta = torch.tensor([0.5, 4.0], dtype=torch.float64)
    params = list(model.parameters())
    H = _dense_curvature(model, X, y, params, "classification")
    dvec = torch.cat([torch.full((16,), 0.5), torch.full((15,), 4.0)]).double()
    ref = _dense_lml(H, _flat(params), dvec, _cls_loglik(model, X, y))
    assert torch.allclose(la.log_marginal_likelihood(delta), ref, rtol=EXACT)
    Sigma = torch.linalg.inv(H + torch.diag(dvec))
    la.prior_precision = delta
    assert torch.allclose(la.posterior_covariance(), Sigma, rtol=1e-7, atol=1e-12)
    assert torch.allclose(la.posterior_variance(), torch.diagonal(Sigma), rtol=1e-7)


def test_streaming_over_batches_equals_one_batch():
    model = _mlp()
    X, y = _cls_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=7)
    for structure in ("full", "kfac"):
        for subset in ("all", "last_layer"):
            a = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure=structure, subset=subset)
            b = Laplace(model, nn.CrossEntropyLoss(), loader, structure=structure, subset=subset)
            assert b.num_data == 30
            assert torch.allclose(a.log_marginal_likelihood(), b.log_marginal_likelihood())


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_ignored_targets_are_no_data(subset, structure):
    # targets equal to ignore_index (padding) count neither in the likelihood, the curvature nor
    # num_data: the same posterior as the labelled examples alone
    model = _mlp()
    X, y = _cls_data()
    y[:8] = 7
    keep = y != 7
    loss_fn = nn.CrossEntropyLoss(ignore_index=7)
    la = Laplace(model, loss_fn, (X, y), subset=subset, structure=structure)
    ref = Laplace(
        model, nn.CrossEntropyLoss(), (X[keep], y[keep]), subset=subset, structure=structure
    )
    assert la.num_data == ref.num_data == int(keep.sum())
    assert la.loss == pytest.approx(ref.loss, rel=EXACT)
    assert torch.allclose(la.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=EXACT)
    with pytest.raises(ValueError, match="every target is ignored"):
        Laplace(model, loss_fn, (X, torch.full_like(y, 7)), subset=subset, structure=structure)
