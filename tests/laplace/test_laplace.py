"""second.laplace.Laplace against dense float64 computations on small models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from dense_reference import ref_output_jacobians
from second import exact_ggn, exact_hessian
from second.kfac import KFACOperator
from second.laplace import Laplace

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


@pytest.mark.parametrize("structure", ["full", "diag", "kfac"])
def test_glm_covariance_is_j_sigma_jt(structure):
    model = _mlp()
    X, y = _cls_data()
    la = Laplace(
        model, nn.CrossEntropyLoss(), (X, y), structure=structure, prior_precision=2.0, subset="all"
    )
    Xt = _cls_data(n=7, seed=5)[0]
    f, cov = la.functional_covariance(Xt)
    J = ref_output_jacobians(model, list(model.parameters()), Xt)
    Sigma = la.posterior_covariance()
    ref = torch.einsum("ncp,pq,ndq->ncd", J, Sigma, J)
    assert torch.allclose(f, model(Xt).detach())
    assert torch.allclose(cov, ref, rtol=1e-8, atol=1e-12)
    # probit on this covariance
    var = torch.diagonal(ref, dim1=1, dim2=2)
    probit = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1)
    assert torch.allclose(la.predict(Xt, link="probit"), probit, rtol=1e-8)


def test_last_layer_glm_and_regression_predictive():
    model = _mlp(out=2)
    X, y = _reg_data()
    la = Laplace(model, nn.MSELoss(), (X, y), subset="last_layer", sigma_noise=0.3)
    Xt = _reg_data(n=5, seed=7)[0]
    J = ref_output_jacobians(model, list(model[2].parameters()), Xt)
    ref = torch.einsum("ncp,pq,ndq->ncd", J, la.posterior_covariance(), J)
    mean, cov = la.predict(Xt)
    assert torch.allclose(mean, model(Xt).detach())
    assert torch.allclose(cov, ref + 0.09 * torch.eye(2, dtype=torch.float64), rtol=1e-8)


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


def test_state_dict_round_trip(tmp_path):
    model = _mlp()
    X, y = _cls_data()
    for structure in ("full", "diag", "lowrank", "kfac", "ekfac"):
        la = Laplace(
            model, nn.CrossEntropyLoss(), (X, y), structure=structure, rank=4, subset="all"
        )
        la.optimize_prior_precision(per_group=True)
        path = tmp_path / f"{structure}.pt"
        torch.save(la.state_dict(), path)
        new = Laplace(model, nn.CrossEntropyLoss(), structure=structure, subset="all")
        new.load_state_dict(torch.load(path))
        assert torch.equal(new.prior_precision, la.prior_precision)
        assert torch.allclose(new.log_marginal_likelihood(), la.log_marginal_likelihood())
        Xt = X[:4]
        assert torch.allclose(new.predict(Xt), la.predict(Xt))
    with pytest.raises(ValueError, match="structure"):
        Laplace(model, nn.CrossEntropyLoss(), structure="diag", subset="all").load_state_dict(
            la.state_dict()
        )


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


def test_mc_predictives_converge_to_their_targets():
    model = _mlp()
    X, y = _cls_data()
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="last_layer", prior_precision=5.0)
    Xt = X[:5]
    g = torch.Generator().manual_seed(0)
    mc = la.predict(Xt, link="mc", n_samples=20000, generator=g)
    nn_ = la.predict(Xt, pred="nn", n_samples=20000, generator=g)
    # a linear last layer: the network's samples are the linearised ones
    assert torch.allclose(mc, nn_, atol=0.01)
    assert torch.allclose(mc.sum(1), torch.ones(5, dtype=torch.float64))
    bridge = la.predict(Xt, link="bridge")
    assert torch.allclose(bridge.sum(1), torch.ones(5, dtype=torch.float64))


def test_bridge_formula():
    model = _mlp()
    X, y = _cls_data()
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), prior_precision=3.0, subset="all")
    f, cov = la.functional_covariance(X[:3])
    v = torch.diagonal(cov, dim1=1, dim2=2)
    C = 3
    alpha = (1 - 2 / C + f.exp() / C**2 * torch.exp(-f).sum(1, keepdim=True)) / v
    assert torch.allclose(la.predict(X[:3], link="bridge"), alpha / alpha.sum(1, keepdim=True))


def test_invalid_arguments_are_refused():
    model = _mlp()
    X, y = _cls_data()
    data = (X, y)
    with pytest.raises(ValueError, match="CrossEntropyLoss"):
        Laplace(model, nn.L1Loss(), data, subset="all")
    with pytest.raises(ValueError, match="structure"):
        Laplace(model, nn.CrossEntropyLoss(), data, structure="kron", subset="all")
    with pytest.raises(ValueError, match="Hessian"):
        Laplace(
            model, nn.CrossEntropyLoss(), data, structure="kfac", curvature="hessian", subset="all"
        )
    with pytest.raises(ValueError, match="prior_precision"):
        Laplace(model, nn.CrossEntropyLoss(), data, prior_precision=0.0, subset="all")
    with pytest.raises(ValueError, match="groups"):
        Laplace(model, nn.CrossEntropyLoss(), data, prior_precision=torch.ones(3), subset="all")
    with pytest.raises(ValueError, match="sigma_noise"):
        Laplace(model, nn.CrossEntropyLoss(), data, sigma_noise=2.0, subset="all")
    with pytest.raises(ValueError, match="hand-picked"):
        Laplace(model, nn.CrossEntropyLoss(), data, subset=[model[0].weight], structure="kfac")
    with pytest.raises(RuntimeError, match="not fitted"):
        Laplace(model, nn.CrossEntropyLoss(), subset="all").log_marginal_likelihood()
    la = Laplace(model, nn.CrossEntropyLoss(), data, curvature="hessian", subset="all")
    with pytest.raises(ValueError, match="not positive definite"):
        la.log_marginal_likelihood(1e-8)
    with pytest.raises(ValueError, match="pred"):
        la.predict(X, pred="laplace")


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


def test_last_layer_refuses_a_model_whose_output_is_not_the_last_linears():
    """A tied output embedding: the last nn.Linear is a hidden layer; a silent last-layer
    Laplace would use its 8 outputs as the model's 10 (classes)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.h = nn.Embedding(10, 8), nn.Linear(8, 8)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.h(self.e(x).mean(1))), self.e.weight)

    torch.manual_seed(0)
    model = Tied().double()
    X, y = torch.randint(0, 10, (12, 5)), torch.randint(0, 10, (12,))
    with pytest.raises(ValueError, match="not the output of its last nn.Linear"):
        Laplace(model, nn.CrossEntropyLoss(), (X, y))
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="all", structure="kfac")
    assert la.predict(X[:3]).shape == (3, 10)


STRUCTURES_ON_DATA = ["full", "diag", "lowrank", "kfac"]


@pytest.mark.parametrize("structure", STRUCTURES_ON_DATA)
@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_one_output_regression_takes_targets_n_as_n_by_1(subset, structure):
    # targets [n] of outputs [n, 1] (1-D regression as usually written) are the outputs' targets
    # in every structure, as for [n, 1] targets; the curvature operators once broadcast them
    # to [n, n] (a curvature n times too large). Exact: a linear model against the closed form.
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    g = torch.Generator().manual_seed(3)
    X, y = torch.randn(20, 2, dtype=torch.float64, generator=g), torch.randn(20, generator=g)
    Xa = torch.cat([X, torch.ones(20, 1, dtype=torch.float64)], 1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    H = Xa.T @ Xa
    loglik = -0.5 * float(((Xa @ theta - y) ** 2).sum()) - 20 * math.log(math.sqrt(2 * math.pi))
    la = Laplace(model, nn.MSELoss(), (X, y), subset=subset, structure=structure, rank=3)
    column = Laplace(model, nn.MSELoss(), (X, y[:, None]), subset=subset, structure=structure)
    assert torch.allclose(
        la.log_marginal_likelihood(), column.log_marginal_likelihood(), rtol=EXACT
    )
    if structure in ("full", "lowrank", "kfac"):  # exact for one linear layer
        ref = _dense_lml(H, theta, torch.ones(3, dtype=torch.float64), loglik)
        assert torch.allclose(la.log_marginal_likelihood(), ref, rtol=ITERATIVE)
    with pytest.raises(ValueError, match="shaped like the outputs"):
        Laplace(nn.Linear(2, 2).double(), nn.MSELoss(), (X, y), subset=subset)


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


def test_losses_that_are_not_a_likelihood_and_models_in_training_mode_are_refused():
    from second import NonDeterministicDataError, NonFiniteError

    X, y = _cls_data()
    model = _mlp()
    for loss_fn in (
        nn.CrossEntropyLoss(weight=torch.ones(3)),
        nn.CrossEntropyLoss(label_smoothing=0.1),
    ):
        with pytest.raises(ValueError, match="categorical"):
            Laplace(model, loss_fn, (X, y))
    for layer in (nn.Dropout(0.2), nn.BatchNorm1d(4)):
        noisy = nn.Sequential(nn.Linear(3, 4), layer, nn.Tanh(), nn.Linear(4, 3)).double()
        for subset in ("last_layer", "all"):
            for structure in ("full", "diag"):
                with pytest.raises(NonDeterministicDataError, match="eval"):
                    Laplace(
                        noisy, nn.CrossEntropyLoss(), (X, y), subset=subset, structure=structure
                    )
        noisy.eval()
        Laplace(noisy, nn.CrossEntropyLoss(), (X, y))  # fine in eval mode
    X[3, 1] = float("nan")  # not "tied embeddings", not a NaN marginal likelihood
    for subset in ("last_layer", "all"):
        for structure in ("full", "diag"):
            with pytest.raises(NonFiniteError, match="not finite"):
                Laplace(model, nn.CrossEntropyLoss(), (X, y), subset=subset, structure=structure)


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
