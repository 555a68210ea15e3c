"""The predictives (laplace/_predictive.py): the GLM covariance (dense and factored
Jacobians), the links and the sampled predictives, against dense float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dense_reference import ref_output_jacobians
from laplace_cases import EXACT, _cls_data, _mlp, _reg_data
from second.laplace import Laplace
from second.laplace._predictive import link_probabilities


class _Shared(nn.Module):
    """One Linear applied twice (a weight used at two places: a sum of rank-one terms)."""

    def __init__(self):
        super().__init__()
        self.inner, self.out = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class _Tokens(nn.Module):
    """A Linear over positions ``[n, T, d]`` and an embedding: the per-position paths."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(5, 3), nn.Linear(3, 2), nn.Linear(8, 3)

    def forward(self, idx):
        return self.out(torch.tanh(self.lin(self.emb(idx))).flatten(1))


class _Attention(nn.Module):
    """Self-attention (query, key, value and output projections as Kronecker blocks)."""

    def __init__(self):
        super().__init__()
        self.att, self.out = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(12, 3)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.out(torch.tanh(h).flatten(1))


def _model(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    if kind == "layernorm":  # LayerNorm's affine parameters take the diagonal fallback
        return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    if kind == "gconv":  # a grouped convolution: a Kronecker block per group
        layers = [nn.Conv2d(2, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)]
        return nn.Sequential(*layers).double()
    if kind == "shared":
        return _Shared().double()
    if kind == "attention":
        return _Attention().double().eval()
    return _Tokens().double()


def _inputs(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    if kind in ("conv", "gconv"):
        return torch.randn(n, 1 if kind == "conv" else 2, 3, 3, dtype=torch.float64, generator=g)
    if kind == "tokens":
        return torch.randint(0, 5, (n, 4), generator=g)
    if kind == "attention":
        return torch.randn(n, 3, 4, dtype=torch.float64, generator=g)
    return torch.randn(n, 3, dtype=torch.float64, generator=g)


@pytest.mark.parametrize(
    ("kind", "structure", "subset", "per_group"),
    [
        ("mlp", "kfac", "all", False),
        ("mlp", "ekfac", "all", True),
        ("mlp", "kfac", "last_layer", False),
        ("layernorm", "kfac", "all", True),
        ("conv", "kfac", "all", False),
        ("gconv", "ekfac", "all", True),
        ("shared", "kfac", "all", True),
        ("tokens", "ekfac", "all", True),
        pytest.param(
            "attention",
            "kfac",
            "all",
            True,
            # torch has no batching rule for the attention's backward: a slower fallback
            marks=pytest.mark.filterwarnings("ignore:There is a performance drop"),
        ),
    ],
)
def test_kronecker_glm_covariance_is_j_sigma_jt(kind, structure, subset, per_group):
    model = _model(kind)
    X = _inputs(kind, 24, 1)
    y = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), structure=structure, subset=subset)
    if per_group:
        la.prior_precision = torch.linspace(0.5, 3.0, len(la.groups), dtype=torch.float64)
    else:
        la.prior_precision = 2.0
    Xt = _inputs(kind, 6, 3)
    f, cov = la.functional_covariance(Xt)
    if subset == "last_layer":
        module, inputs = la._inputs(Xt)
    else:
        module, inputs = model, Xt
    J = ref_output_jacobians(module, la.params, inputs)
    ref = torch.einsum("ncp,pq,ndq->ncd", J, la.posterior_covariance(), J)
    assert torch.allclose(f, model(Xt).detach())
    assert torch.allclose(cov, ref, rtol=EXACT, atol=1e-12)


@pytest.mark.parametrize("kind", ["mlp", "conv", "tokens"])
def test_kronecker_covariance_in_small_chunks(kind, monkeypatch):
    """A budget of a few floats: one example per chunk and per layer block, the same result."""
    import second.laplace._predictive as predictive

    model = _model(kind)
    X = _inputs(kind, 20, 1)
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(2))
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="all", structure="kfac")
    Xt = _inputs(kind, 5, 3)
    _, expected = la.functional_covariance(Xt)
    monkeypatch.setattr(predictive, "_JACOBIAN_BUDGET", 8)
    _, cov = la.functional_covariance(Xt)
    assert torch.allclose(cov, expected, rtol=EXACT, atol=1e-14)


def test_centered_probit_ignores_the_logits_common_mode():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(4, 3, dtype=torch.float64, generator=g)
    B = torch.randn(4, 3, 3, dtype=torch.float64, generator=g)
    cov = B @ B.transpose(1, 2)
    C = 3
    P = torch.eye(C, dtype=torch.float64) - 1.0 / C
    var = torch.diagonal(P @ cov @ P, dim1=1, dim2=2)
    expected = torch.softmax(f / torch.sqrt(1 + math.pi / 8 * var), -1)
    got = link_probabilities(f, cov, "probit_centered")
    assert torch.allclose(got, expected, rtol=EXACT)
    # a shift of all logits with variance 5 changes no softmax: nor this link
    shifted = cov + 5.0 * torch.ones(3, 3, dtype=torch.float64)
    assert torch.allclose(link_probabilities(f, shifted, "probit_centered"), got, rtol=EXACT)
    # the plain probit reads it as uncertainty
    assert not torch.allclose(link_probabilities(f, shifted, "probit"), got, rtol=1e-3)


def test_default_link_is_the_objects():
    model = _model("mlp")
    X = _inputs("mlp", 20, 1)
    y = torch.randint(0, 3, (20,), generator=torch.Generator().manual_seed(2))
    Xt = _inputs("mlp", 5, 3)
    la = Laplace(model, nn.CrossEntropyLoss(), (X, y), subset="last_layer", link="bridge")
    assert torch.equal(la.predict(Xt), la.predict(Xt, link="bridge"))
    with pytest.raises(ValueError, match="link must be one of"):
        Laplace(model, nn.CrossEntropyLoss(), None, link="logit")


@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("frozen", [None, "bias", "weight"])
def test_last_layer_ggn_in_closed_form_is_the_dense_ggn(likelihood, frozen):
    """The last layer's GGN from its features, with either parameter frozen, in batches."""
    from second import exact_ggn

    model = _model("mlp")
    if frozen is not None:
        getattr(model[2], frozen).requires_grad_(False)
    X = _inputs("mlp", 25, 1)
    if likelihood == "classification":
        y = torch.randint(0, 3, (25,), generator=torch.Generator().manual_seed(2))
        loss_fn, summed = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
        scale = 1.0
    else:
        y = torch.randn(25, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        loss_fn, summed = nn.MSELoss(), nn.MSELoss(reduction="sum")
        scale = 0.5  # the Gaussian NLL is half the squared error
    batches = [(X[:10], y[:10]), (X[10:], y[10:])]
    la = Laplace(model, loss_fn, batches)
    params = [p for p in model[2].parameters() if p.requires_grad]
    out = model(X)
    ref = scale * exact_ggn(summed(out, y), out, params)
    assert torch.allclose(la._structure.H, ref, rtol=EXACT, atol=1e-12)
    H = la._last_layer_ggn(la._inputs(X)[1], y, chunk=7)  # several chunks
    assert torch.allclose(scale * H, ref, rtol=EXACT, atol=1e-12)


class _TwoInputs(nn.Module):
    """``model(x, z)``: two inputs (a dict batch ``{"x", "z", "labels"}`` in the HF style)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(3, 5), nn.Linear(2, 5), nn.Linear(5, 3)

    def forward(self, x, z):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


class _Joined(nn.Module):
    """The same network on one tensor ``[x, z]`` (the reference)."""

    def __init__(self, two: _TwoInputs):
        super().__init__()
        self.two = two

    def forward(self, xz):
        return self.two(xz[:, :3], xz[:, 3:])


SAME_PREDICTIVE = dict(rtol=1e-10, atol=1e-12)  # float64, the same computation on two layouts


@pytest.mark.parametrize(
    "subset, structure", [("last_layer", "full"), ("all", "kfac"), ("all", "diag"), ("all", "full")]
)
def test_dict_and_tuple_inputs_predict_as_one_tensor(subset, structure):
    torch.manual_seed(0)
    two = _TwoInputs().double()
    x, z = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(subset=subset, structure=structure)
    batches = [
        {"x": x[s : s + 5], "z": z[s : s + 5], "labels": y[s : s + 5]} for s in (0, 5, 10, 15)
    ]
    la = Laplace(two, loss_fn, batches, **kw)
    xz = torch.cat([x, z], 1)
    ref = Laplace(
        _Joined(two), loss_fn, [(xz[s : s + 5], y[s : s + 5]) for s in (0, 5, 10, 15)], **kw
    )
    want = ref.predict(torch.cat([x[:4], z[:4]], 1))
    got_dict = la.predict({"x": x[:4], "z": z[:4], "labels": y[:4]})  # the target is left out
    got_tuple = la.predict((x[:4], z[:4]))
    torch.testing.assert_close(got_dict, want, **SAME_PREDICTIVE)
    torch.testing.assert_close(got_tuple, want, **SAME_PREDICTIVE)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(
        la.predict((x[:4], z[:4]), pred="nn", n_samples=5, generator=g1),
        ref.predict(torch.cat([x[:4], z[:4]], 1), pred="nn", n_samples=5, generator=g2),
        **SAME_PREDICTIVE,
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
