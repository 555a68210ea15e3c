"""KFACOperator (kfac/operators.py) against dense float64 references.

EKFACOperator too where the two behave alike; the inverses are tested in
test_kfac_inverse.py, what is EK-FAC's own in test_ekfac.py.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import second
from kfac_cases import (
    DT,
    EXACT_TOL,
    LOSSES,
    Scaled,
    TokenModel,
    closure_of,
    deep_linear,
    dense_ggn,
    layer_blocks,
    param_slices,
    tanh_net,
)
from second import EKFACOperator, GGNOperator, KFACOperator, exact_fisher
from second._errors import SecondDeprecationWarning

MC_REL_TOL = 0.1  # Monte-Carlo G with 4,000 samples vs the type-2 G (sampling error ~3%)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_kfac_equals_ggn_block_deep_linear_one_datum(loss, dtype):
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = deep_linear(dtype), make_loss()
    X, y = torch.randn(1, 4, dtype=dtype), make_y(1, 3)
    y = y.to(dtype) if y.is_floating_point() else y
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    G = dense_ggn(model, loss_fn, X, y)
    for s in layer_blocks(model):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[dtype])


@pytest.mark.parametrize("loss", ["mse-mean", "ce-sum", "bce-mean"])
def test_kfac_exact_one_datum_nonlinear(loss):
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = tanh_net(), make_loss()
    X, y = torch.randn(1, 4, dtype=DT), make_y(1, 3)
    K = KFACOperator(model, loss_fn, (X, y)).to_dense()
    G = dense_ggn(model, loss_fn, X, y)
    for s in layer_blocks(model):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[DT])


def test_conv_and_embedding_exact_one_position():
    # a kernel covering the image has one output position: KFAC is exact per layer
    conv = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3), nn.Flatten(), nn.Linear(3, 2)).double()
    X, y = torch.randn(1, 2, 3, 3, dtype=DT), torch.randint(0, 2, (1,))
    loss_fn = nn.CrossEntropyLoss()
    K = KFACOperator(conv, loss_fn, (X, y)).to_dense()
    G = dense_ggn(conv, loss_fn, X, y)
    for s in layer_blocks(conv):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[DT])

    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(3, 2)).double()
    idx, t = torch.tensor([[2]]), torch.randn(1, 2, dtype=DT)
    K = KFACOperator(emb, nn.MSELoss(), (idx, t)).to_dense()
    G = dense_ggn(emb, nn.MSELoss(), idx, t)
    for s in layer_blocks(emb):
        torch.testing.assert_close(K[s, s], G[s, s], **EXACT_TOL[DT])


def test_conv_patches_follow_weight_layout():
    # one output channel summed over 9 positions, MSE: the exact block is
    # 2 (sum_t a_t)(sum_t a_t)^T and KFAC's (expand convention) 2 sum_t a_t a_t^T, with
    # a_t the patches in the weight's (C_in, kh, kw) order and a trailing 1 for the bias
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 1, kernel_size=2, padding=1, stride=2, bias=True)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(9, 1, bias=False)).double()
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    X, y = torch.randn(1, 2, 5, 5, dtype=DT), torch.randn(1, 1, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    G = dense_ggn(model, nn.MSELoss(), X, y)
    s = layer_blocks(model)[0]
    patches = nn.functional.unfold(X, 2, padding=1, stride=2)[0].T  # [T, C*kh*kw]
    a = torch.cat([patches, torch.ones(patches.shape[0], 1, dtype=DT)], 1)
    asum = a.sum(0, keepdim=True)
    torch.testing.assert_close(G[s, s], 2 * asum.T @ asum, **EXACT_TOL[DT])  # layout check
    torch.testing.assert_close(K[s, s], 2 * a.T @ a, **EXACT_TOL[DT])


@pytest.mark.parametrize(
    "loss", ["ce-mean", "ce-soft", "ce-soft-half-sum", "ce-soft-weighted-smoothed"]
)
def test_empirical_kfac_equals_empirical_fisher_one_datum(loss):
    # class-probability targets included (their closed-form gradient raised before)
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = tanh_net(), make_loss()
    X, y = torch.randn(1, 4, dtype=DT), make_y(1, 3)
    K = KFACOperator(model, loss_fn, (X, y), fisher="empirical").to_dense()
    losses = loss_fn(model(X), y).reshape(1)
    Fm = exact_fisher(losses, list(model.parameters()))
    for s in layer_blocks(model):
        torch.testing.assert_close(K[s, s], Fm[s, s], **EXACT_TOL[DT])


def test_mc_fisher_estimates_type2():
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(3, 4, dtype=DT), torch.randint(0, 3, (3,))
    exact = KFACOperator(model, loss_fn, (X, y))
    mc = KFACOperator(model, loss_fn, (X, y), fisher="mc", mc_samples=4000)
    for (_, A1, G1), (_, A2, G2) in zip(exact.layers, mc.layers):
        torch.testing.assert_close(A1, A2)
        assert torch.linalg.norm(G1 - G2) / torch.linalg.norm(G1) < MC_REL_TOL


def test_scaling_convention_mean_vs_sum():
    # MSELoss(mean) is the sum over N examples and C outputs divided by N*C
    model = tanh_net()
    X, y = torch.randn(7, 4, dtype=DT), torch.randn(7, 3, dtype=DT)
    Km = KFACOperator(model, nn.MSELoss(), (X, y)).to_dense()
    Ks = KFACOperator(model, nn.MSELoss(reduction="sum"), (X, y)).to_dense()
    torch.testing.assert_close(Ks, 7 * 3 * Km, **EXACT_TOL[DT])


def test_batches_equal_concatenated_batch():
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(10, 4, dtype=DT), torch.randn(10, 3, dtype=DT)
    whole = KFACOperator(model, loss_fn, (X, y)).to_dense()
    parts = KFACOperator(model, loss_fn, [(X[:3], y[:3]), (X[3:], y[3:])]).to_dense()
    torch.testing.assert_close(parts, whole, **EXACT_TOL[DT])


def test_operator_interface_and_damping():
    model = tanh_net()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    Kd = KFACOperator(model, nn.MSELoss(), (X, y), damping=0.3)
    n = K.shape[0]
    assert K.psd and K.symmetric
    D = K.to_dense()
    torch.testing.assert_close(D, D.T)
    assert torch.linalg.eigvalsh(D).min() > -1e-12
    torch.testing.assert_close(Kd.to_dense(), D + 0.3 * torch.eye(n, dtype=DT))
    v = torch.randn(n, dtype=DT)
    torch.testing.assert_close(K @ v, D @ v)


def test_fallback_parameters():
    model = Scaled().double()
    X, y = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    assert K.fallback_parameters[0] is model.scale
    G = dense_ggn(model, nn.MSELoss(), X, y)
    s = param_slices(model)[[id(p) for p in model.parameters()].index(id(model.scale))]
    D = K.to_dense()
    torch.testing.assert_close(D[s, s], torch.diag(G[s, s].diagonal()), **EXACT_TOL[DT])
    Ki = KFACOperator(model, nn.MSELoss(), (X, y), fallback="identity", damping=0.5)
    torch.testing.assert_close(Ki.to_dense()[s, s], 0.5 * torch.eye(3, dtype=DT))


@pytest.mark.parametrize(
    "kwargs, err",
    [
        (dict(fisher="kfac"), ValueError),
        (dict(fallback="zero"), ValueError),
        (dict(damping=-1.0), ValueError),
        (dict(mc_samples=0), ValueError),
    ],
)
def test_operator_validation(kwargs, err):
    X, y = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, dtype=DT)
    with pytest.raises(err):
        KFACOperator(tanh_net(), nn.MSELoss(), (X, y), **kwargs)


def test_unsupported_loss_needs_empirical():
    X, y = torch.randn(2, 4, dtype=DT), torch.randn(2, 3, dtype=DT)
    with pytest.raises(NotImplementedError, match="empirical"):
        KFACOperator(tanh_net(), nn.L1Loss(), (X, y))
    K = KFACOperator(tanh_net(), nn.L1Loss(), (X, y), fisher="empirical")
    assert torch.isfinite(K.to_dense()).all()


def test_approximations_is_a_deprecated_alias(monkeypatch):
    monkeypatch.delitem(sys.modules, "second.approximations", raising=False)
    monkeypatch.delitem(sys.modules, "second.approximations.kfac", raising=False)
    match = r"second\.approximations is deprecated and stops working in 0\.3: use second\.kfac"
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        import second.approximations as old  # an import statement: the user's line
    assert rec[0].filename == __file__  # the warning points at the importing line
    assert old.KFACOperator is KFACOperator and old.EKFACOperator is EKFACOperator
    assert old.KFACInverseOperator is second.kfac.KFACInverseOperator
    assert old.EKFACInverseOperator is second.kfac.EKFACInverseOperator
    assert second.kfac.KFACOperator is second.KFACOperator


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_restrict_keeps_the_kind_and_options(cls):
    # an MC-Fisher KFAC on one batch stays an MC-Fisher KFAC with the same samples and damping
    model, loss_fn = tanh_net(), nn.CrossEntropyLoss()
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    gen = torch.Generator().manual_seed(5)
    opts = dict(fisher="mc", mc_samples=3, damping=0.2, fallback="identity")
    K = cls(model, loss_fn, [(X[:5], y[:5]), (X[5:], y[5:])], generator=gen, **opts)
    R = K.restrict((X[:5], y[:5]))
    want = cls(model, loss_fn, (X[:5], y[:5]), generator=torch.Generator().manual_seed(5), **opts)
    assert type(R) is cls and (R.fisher, R.mc_samples, R.damping) == ("mc", 3, 0.2)
    torch.testing.assert_close(R.to_dense(), want.to_dense(), rtol=0, atol=0)
    other = cls(model, loss_fn, (X[:5], y[:5]), generator=torch.Generator().manual_seed(6), **opts)
    assert not torch.equal(R.to_dense(), other.to_dense())  # the samples do matter


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_dict_batches_equal_pair_batches(fisher):
    # the HuggingFace layout: a dict of tensors with the targets under "labels"
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tanh_net()

        def forward(self, x):
            return self.body(x)

    model, loss_fn = Net(), nn.CrossEntropyLoss()
    X, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    pairs = [(X[:5], y[:5]), (X[5:], y[5:])]
    dicts = [{"x": X[:5], "labels": y[:5]}, {"x": X[5:], "labels": y[5:]}]
    for cls in (KFACOperator, EKFACOperator):
        want = cls(model, loss_fn, pairs, fisher=fisher).to_dense()
        got = cls(model, loss_fn, dicts, fisher=fisher).to_dense()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_padded_positions_stay_out_of_the_factors(cls, fisher):
    # ragged sequences padded with ignore_index: the operator equals the sum over each
    # sequence cut at its own length (before, only examples whose targets were all ignored
    # were left out, so the padded positions of a partly padded sequence counted in A: 37%
    # off on this batch, while the optimizer already left them out)
    torch.manual_seed(0)
    model = TokenModel(classes_first=True).double()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randint(0, 20, (6, 7), generator=g), torch.randint(0, 20, (6, 7), generator=g)
    lengths = [2, 5, 5, 7, 5, 3]
    padded = y.clone()
    for i, t in enumerate(lengths):
        padded[i, t:] = -100
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    got = cls(model, loss_fn, [(x, padded)], fisher=fisher)
    cut = [(x[i : i + 1, :t], y[i : i + 1, :t]) for i, t in enumerate(lengths)]
    want = cls(model, loss_fn, cut, fisher=fisher)
    for a, b in zip(got.A + got.G, want.A + want.G):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-10, atol=1e-12)
    # the mean over the kept positions: the batch without the padded columns
    mean = nn.CrossEntropyLoss()
    padded = y.clone()
    padded[:, 5:] = -100
    got = cls(model, mean, [(x, padded)], fisher=fisher).to_dense()
    torch.testing.assert_close(
        got,
        cls(model, mean, [(x[:, :5], y[:, :5])], fisher=fisher).to_dense(),
        rtol=1e-10,
        atol=1e-12,
    )


class _EncoderHead(nn.Module):
    """A layer with a row per example (``enc``) before one with a row per position."""

    def __init__(self, positions=4, classes=5):
        super().__init__()
        self.enc, self.head = nn.Linear(3, 6), nn.Linear(6, classes)
        self.register_buffer("pos", torch.randn(positions, 6))

    def forward(self, x):
        return self.head(torch.tanh(self.enc(x)).unsqueeze(1) + self.pos).transpose(1, 2)


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
def test_an_example_with_every_target_ignored_leaves_every_layer(fisher):
    # the per-position mask does not fit the encoder's rows: there, the examples whose
    # positions are all ignored are left out (they stayed in after the per-position change)
    torch.manual_seed(0)
    model, loss_fn = _EncoderHead().double(), nn.CrossEntropyLoss(reduction="sum")
    X, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 5, (5, 4))
    ignored = y.clone()
    ignored[0] = -100
    ignored[1, 2:] = -100
    got = KFACOperator(model, loss_fn, [(X, ignored)], fisher=fisher)
    want = KFACOperator(model, loss_fn, [(X[1:], y[1:])], fisher=fisher)
    torch.testing.assert_close(got.A[0], want.A[0], rtol=1e-12, atol=1e-14)

    def optimizer_factor(inputs, targets):  # the optimizer's, after one step
        net = copy.deepcopy(model)
        opt = second.optim.KFAC(net, loss_fn, fisher=fisher)
        opt.step(closure_of(opt, net, loss_fn, inputs, targets))
        return opt.layers[0].state_in(opt.state)["A"]

    torch.testing.assert_close(
        optimizer_factor(X, ignored), optimizer_factor(X[1:], y[1:]), rtol=1e-12, atol=1e-14
    )


def test_label_smoothing_gives_the_plain_loss_curvature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    smooth, plain = nn.CrossEntropyLoss(label_smoothing=0.1), nn.CrossEntropyLoss()
    for make in (KFACOperator, EKFACOperator, GGNOperator):
        torch.testing.assert_close(
            make(model, smooth, (X, y)).to_dense(), make(model, plain, (X, y)).to_dense()
        )

    def fisher(loss_fn):
        g = torch.Generator().manual_seed(0)
        F = second.FisherOperator(model, loss_fn, (X, y), fisher="mc", generator=g)
        return F.to_dense()

    torch.testing.assert_close(fisher(smooth), fisher(plain), rtol=0, atol=0)
    opt = second.optim.KFAC(nn.Sequential(nn.Linear(4, 3)).double(), smooth)  # no refusal
    assert opt.approximations()


@pytest.mark.parametrize("loss_fn", [nn.NLLLoss(), nn.L1Loss()], ids=["nll", "l1"])
def test_a_loss_linear_in_the_output_is_refused_with_the_reason(loss_fn):
    # its Gauss-Newton matrix is zero: an operator of zeros would be garbage, not an answer
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(1)).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,)) if isinstance(loss_fn, nn.NLLLoss) else torch.randn(5, 3).double()
    with pytest.raises(ValueError, match="Gauss-Newton matrix is zero"):
        GGNOperator(model, loss_fn, (X, y))
    with pytest.raises(NotImplementedError, match="Gauss-Newton matrix is zero"):
        KFACOperator(model, loss_fn, (X, y))
    H = second.HessianOperator(model, loss_fn, (X, y))  # the Hessian is still there
    assert H.shape == (15, 15)


WEIGHTED_LOSSES = {
    "ignore_index": nn.CrossEntropyLoss(),
    "class weights": nn.CrossEntropyLoss(weight=torch.tensor([1.0, 4.0, 0.5], dtype=DT)),
    "weights and smoothing": nn.CrossEntropyLoss(
        weight=torch.tensor([1.0, 4.0, 0.5], dtype=DT), label_smoothing=0.2
    ),
}


@pytest.mark.parametrize("fisher", ["type2", "empirical"])
@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("loss", list(WEIGHTED_LOSSES))
def test_weighted_mean_losses_do_not_depend_on_the_batching(loss, cls, fisher):
    # torch's mean of a weighted or padded cross-entropy divides each batch by its valid
    # targets' weights: a batch's share of the mean over all the data is W_b / W (it was
    # n_b / N: factors 2-10% off with some splits), and a batch whose targets are all ignored
    # is no datum (it raised on its NaN loss)
    torch.manual_seed(0)
    X = torch.randn(12, 4, dtype=DT)
    y = torch.randint(0, 3, (12,))
    y[:3] = -100  # the first batch of 3 has no valid target
    y[7] = -100
    loss_fn = WEIGHTED_LOSSES[loss]
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    whole = cls(model, loss_fn, (X, y), fisher=fisher).to_dense()
    for size in (3, 4, 5):
        batches = [(X[i : i + size], y[i : i + size]) for i in range(0, 12, size)]
        torch.testing.assert_close(cls(model, loss_fn, batches, fisher=fisher).to_dense(), whole)
    with pytest.raises(ValueError, match="no weight"):
        cls(model, loss_fn, (X, torch.full_like(y, -100)), fisher=fisher)
