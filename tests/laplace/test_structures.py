"""The posterior structures (laplace/_structures.py): diag, lowrank, kfac and ekfac against
dense float64 computations, and their samples against the covariance."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from laplace_cases import (
    EXACT,
    ITERATIVE,
    _cls_data,
    _cls_loglik,
    _dense_curvature,
    _dense_lml,
    _flat,
    _mlp,
    _reg_data,
)
from second.kfac import KFACOperator
from second.laplace import Laplace


def test_diag_and_lowrank_match_dense():
    model = _mlp()
    X, y = _cls_data()
    params = list(model.parameters())
    H = _dense_curvature(model, X, y, params, "classification")
    theta, ll = _flat(params), _cls_loglik(model, X, y)
    dvec = torch.full((H.shape[0],), 2.0, dtype=torch.float64)
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure="diag", subset="all")
    ref = _dense_lml(torch.diag(torch.diagonal(H)), theta, dvec, ll)
    assert torch.allclose(la.log_marginal_likelihood(2.0), ref, rtol=EXACT)
    # rank k: the top-k eigenpairs of H, zero elsewhere
    k = 6
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure="lowrank", rank=k, subset="all")
    evals, evecs = torch.linalg.eigh(H)
    Hk = (evecs[:, -k:] * evals[-k:]) @ evecs[:, -k:].T
    ref = _dense_lml(Hk, theta, dvec, ll)
    assert torch.allclose(la.log_marginal_likelihood(2.0), ref, rtol=ITERATIVE)
    # per-group prior through Woodbury
    delta = torch.tensor([0.5, 4.0], dtype=torch.float64)
    dv = torch.cat([torch.full((16,), 0.5), torch.full((15,), 4.0)]).double()
    ref = _dense_lml(Hk, theta, dv, ll)
    assert torch.allclose(la.log_marginal_likelihood(delta), ref, rtol=ITERATIVE)
    la.prior_precision = delta
    # eigsh stops at residual tol * ||H||: the covariance is that accurate in norm
    cov, ref = la.posterior_covariance(), torch.linalg.inv(Hk + torch.diag(dv))
    assert float(torch.linalg.matrix_norm(cov - ref)) <= ITERATIVE * float(
        torch.linalg.matrix_norm(ref)
    )


@pytest.mark.parametrize("structure", ["kfac", "ekfac"])
def test_kfac_matches_its_dense_operator(structure):
    model = _mlp()
    X, y = _cls_data()
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure=structure, subset="all")
    # the dense KFAC matrix of the summed loss, as the kfac package builds it
    from second.kfac import EKFACOperator

    cls = EKFACOperator if structure == "ekfac" else KFACOperator
    K = cls(model, nn.CrossEntropyLoss(reduction="sum"), (X, y)).to_dense()
    theta, ll = _flat(model.parameters()), _cls_loglik(model, X, y)
    delta = torch.tensor([0.5, 4.0], dtype=torch.float64)
    dv = torch.cat([torch.full((16,), 0.5), torch.full((15,), 4.0)]).double()
    ref = _dense_lml(K, theta, dv, ll)
    assert torch.allclose(la.log_marginal_likelihood(delta), ref, rtol=EXACT)
    la.prior_precision = delta
    Sigma = torch.linalg.inv(K + torch.diag(dv))
    assert torch.allclose(la.posterior_covariance(), Sigma, rtol=1e-7, atol=1e-12)
    assert torch.allclose(la.posterior_variance(), torch.diagonal(Sigma), rtol=1e-7)


def test_kfac_exact_for_a_linear_regression_layer():
    # one linear layer with MSE: the GGN is sum_i x_i x_i^T (x) I, a Kronecker product
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = _reg_data()
    full = Laplace(model, nn.MSELoss(), (X, y), sigma_noise=0.5, subset="all")
    kfac = Laplace(model, nn.MSELoss(), (X, y), structure="kfac", sigma_noise=0.5, subset="all")
    for delta in (0.1, 1.0, 10.0):
        assert torch.allclose(
            kfac.log_marginal_likelihood(delta), full.log_marginal_likelihood(delta), rtol=EXACT
        )


def test_last_layer_kfac_equals_full_for_one_datum():
    # KFAC of a linear layer on one example is exact (A and G are rank-one factors)
    model = _mlp()
    X, y = _cls_data(n=1)
    full = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="last_layer")
    kfac = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="last_layer", structure="kfac")
    assert torch.allclose(
        kfac.log_marginal_likelihood(0.7), full.log_marginal_likelihood(0.7), rtol=EXACT
    )


@pytest.mark.parametrize("structure", ["full", "lowrank", "kfac"])
def test_sample_covariance_matches_sigma(structure):
    model = _mlp()
    X, y = _cls_data()
    kw = {"rank": 5} if structure == "lowrank" else {}
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure=structure, **kw, subset="all")
    la.prior_precision = torch.tensor([0.5, 4.0], dtype=torch.float64)
    n = 20000
    S = la.sample(n, generator=torch.Generator().manual_seed(0))
    assert S.shape == (n, la.num_params)
    Sigma = la.posterior_covariance()
    d = S - la.mean
    emp = d.T @ d / n
    # entrywise standard error of a sample covariance: sqrt((S_ii S_jj + S_ij^2) / n)
    sd = torch.diagonal(Sigma)
    se = torch.sqrt((sd[:, None] * sd[None, :] + Sigma**2) / n)
    assert float(((emp - Sigma).abs() / se).max()) < 5.5
    assert float((d.mean(0).abs() / (sd / n) ** 0.5).max()) < 5.5
