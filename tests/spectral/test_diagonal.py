"""ggn_diagonal and the diagonal estimator's model-aware paths, against dense float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from second import GGNOperator, HessianOperator
from second.spectral import diagonal, ggn_diagonal
from weighted_cases import WEIGHTED_LOSSES, padded_sequences

DIAG_TOL = dict(rtol=1e-10, atol=1e-12)  # exact in float64, up to summation order


def tiny(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, out)).double()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).flatten(1))


CASES = {
    "mse-mean": (nn.MSELoss(), lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "mse-sum": (nn.MSELoss(reduction="sum"), lambda n: torch.randn(n, 3, dtype=torch.float64)),
    "ce-mean": (nn.CrossEntropyLoss(), lambda n: torch.randint(0, 3, (n,))),
    "ce-sum": (nn.CrossEntropyLoss(reduction="sum"), lambda n: torch.randint(0, 3, (n,))),
    "bce": (nn.BCEWithLogitsLoss(), lambda n: torch.rand(n, 3, dtype=torch.float64).round()),
}


class SequenceModel(nn.Module):
    """A linear layer applied at every position, a strided dilated convolution, a shared head."""

    def __init__(self, shared=False):
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=1)
        self.tok = nn.Linear(4, 5)
        self.head = nn.Linear(5 + 3 * 2 * 2, 3)
        self.shared = shared

    def forward(self, x):  # x: [n, 2, 6, 6]
        seq = x.reshape(x.shape[0], -1, 4)[:, :9]  # [n, 9 positions, 4]
        h = torch.tanh(self.tok(seq)).mean(1)
        if self.shared:  # the same layer twice: not one record per layer
            h = torch.tanh(self.tok(seq[:, :3])).mean(1) + h
        z = torch.tanh(self.c(x)).flatten(1)
        return self.head(torch.cat([h, z], 1))


@pytest.mark.parametrize("method", ["auto", "layers", "vmap"])
@pytest.mark.parametrize("name", list(CASES))
def test_against_the_dense_ggn_over_several_batches(name, method):
    loss_fn, targets = CASES[name]
    model = tiny()
    X, y = torch.randn(13, 4, dtype=torch.float64), targets(13)
    data = [(X[:6], y[:6]), (X[6:], y[6:])]
    dense = torch.diagonal(GGNOperator(model, loss_fn, data).to_dense())
    d = ggn_diagonal(model, loss_fn, data, chunk_size=4, method=method)
    torch.testing.assert_close(d, dense, **DIAG_TOL)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("method", ["auto", "layers", "vmap"])
def test_sequences_strided_convolutions_and_shared_layers(method, shared):
    torch.manual_seed(2)
    model = SequenceModel(shared).double()
    X, y = torch.randn(9, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    loss_fn = nn.CrossEntropyLoss()
    dense = torch.diagonal(GGNOperator(model, loss_fn, data).to_dense())
    if shared and method == "layers":  # a layer that runs twice has no per-layer formula
        with pytest.raises(ValueError, match="more than once"):
            ggn_diagonal(model, loss_fn, data, method=method)
        return
    d = ggn_diagonal(model, loss_fn, data, method=method, chunk_size=2)
    torch.testing.assert_close(d, dense, **DIAG_TOL)


def test_layers_method_refuses_other_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with pytest.raises(ValueError, match="nn.Linear or nn.Conv2d"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), method="layers")
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    torch.testing.assert_close(
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y)), dense, **DIAG_TOL
    )
    with pytest.raises(ValueError, match="method must be"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), method="backpack")


def test_a_cnn_and_a_parameter_subset():
    torch.manual_seed(1)
    model = SmallCNN().double()
    X, y = torch.randn(7, 1, 4, 4, dtype=torch.float64), torch.randint(0, 4, (7,))
    params = [model.fc.weight, model.c.bias]
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y), params).to_dense())
    d = ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), params)
    torch.testing.assert_close(d, dense, **DIAG_TOL)
    with pytest.raises(ValueError, match="not parameters of the model"):
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y), [torch.zeros(2, requires_grad=True)])


def test_diagonal_exact_on_a_ggn_operator_takes_no_operator_products():
    model = tiny()
    X, y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    G = GGNOperator(model, nn.MSELoss(), (X, y))
    est = diagonal(G, method="exact", return_result=True)
    assert G.matvecs == 0 and est.matvecs == 0
    torch.testing.assert_close(est.value, torch.diagonal(G.to_dense()), **DIAG_TOL)


def test_hessian_diagonal_with_the_ggn_as_control_variate():
    model = tiny(out=3)
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    H = HessianOperator(model, nn.MSELoss(), (X, y))
    d = torch.diagonal(H.to_dense())
    plain = diagonal(H, 30, generator=torch.Generator().manual_seed(0), return_result=True)
    cv = diagonal(
        H, 30, control="ggn", generator=torch.Generator().manual_seed(0), return_result=True
    )
    err = lambda e: float((e.value - d).norm() / d.norm())  # noqa: E731
    assert err(cv) < 0.5 * err(plain)
    with pytest.raises(ValueError, match="control"):
        diagonal(GGNOperator(model, nn.MSELoss(), (X, y)), 10, control="ggn")


def test_a_recurrent_model_that_vmap_cannot_batch():
    """nn.GRU writes its hidden state in place: the per-example products loop, same diagonal."""
    from dense_reference import GRUNet

    torch.manual_seed(0)
    model = GRUNet().double()
    X, y = torch.randn(6, 5, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    with pytest.warns(UserWarning, match="falling back to a loop over examples"):
        d = ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y))
    torch.testing.assert_close(d, dense, **DIAG_TOL)


class TiedLM(nn.Module):
    """Tied input and output embeddings: the head's weight is the embedding's."""

    def __init__(self, vocab=7, width=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))))


class TiedLinears(nn.Module):
    """Two nn.Linear modules sharing one weight."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class UsedOutside(nn.Module):
    """A layer's weight also used by F.linear outside the layer (registered once)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        extra = nn.functional.linear(x[:, :3], self.a.weight[:3, :3])
        return self.b(torch.tanh(self.a(x))) + extra


def _dense_ggn(model, loss_fn, X, y):
    """``J^T (d^2 L / d f^2) J`` by torch.func on the model as it is (ties kept, X not cast)."""
    from dense_reference import ref_output_jacobians

    params = list(model.parameters())
    J = ref_output_jacobians(model, params, X).flatten(0, 1)
    out = model(X).detach()
    H_out = torch.func.hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
    return J.T @ H_out @ J


def _dense_hessian(model, loss_fn, X, y):
    """``d^2 L / d theta^2`` by torch.func on the model as it is (ties kept)."""
    names = {id(p): k for k, p in model.named_parameters()}
    params = list(model.parameters())
    keys = [names[id(p)] for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def loss(t):
        parts = t.split([p.numel() for p in params])
        weights = {k: v.view_as(p) for k, v, p in zip(keys, parts, params)}
        return loss_fn(torch.func.functional_call(model, weights, (X,)), y)

    return torch.func.hessian(loss)(theta)


def _tied_case(name):
    torch.manual_seed(0)
    if name == "embedding-head":
        model = TiedLM().double()
        return model, nn.CrossEntropyLoss(), torch.randint(0, 7, (9,)), torch.randint(0, 7, (9,))
    model = (TiedLinears if name == "two-linears" else UsedOutside)().double()
    X = torch.randn(9, 4, dtype=torch.float64)
    if name == "two-linears":
        return model, nn.MSELoss(), X, torch.randn(9, 4, dtype=torch.float64)
    return model, nn.CrossEntropyLoss(), X, torch.randint(0, 3, (9,))


@pytest.mark.parametrize("name", ["embedding-head", "two-linears", "used-outside"])
def test_a_parameter_used_outside_its_layer_gets_the_exact_diagonal(name):
    """A tied or shared weight: the layers' formula would square each use's gradient apart."""
    model, loss_fn, X, y = _tied_case(name)
    want = torch.diagonal(_dense_ggn(model, loss_fn, X, y))
    data = [(X[:4], y[:4]), (X[4:], y[4:])]
    for method in ("auto", "vmap"):
        torch.testing.assert_close(
            ggn_diagonal(model, loss_fn, data, method=method), want, **DIAG_TOL
        )
    est = diagonal(GGNOperator(model, loss_fn, data), method="exact", return_result=True)
    torch.testing.assert_close(est.value, want, **DIAG_TOL)
    match = "outside its layer" if name == "used-outside" else "shared or tied"
    with pytest.raises(ValueError, match=match):
        ggn_diagonal(model, loss_fn, data, method="layers")


def test_the_ggn_control_variate_of_a_tied_model_is_unbiased():
    model, loss_fn, X, y = _tied_case("embedding-head")
    H = HessianOperator(model, loss_fn, (X, y))
    want = torch.diagonal(_dense_hessian(model, loss_fn, X, y))
    ests = [
        diagonal(
            H, 100, control="ggn", generator=torch.Generator().manual_seed(s), return_result=True
        )
        for s in range(10)
    ]
    mean = torch.stack([e.value for e in ests]).mean(0)
    se = torch.stack([e.std_error for e in ests]).mean(0) / len(ests) ** 0.5
    # the GGN part is exact: the mean's error is the residual's noise (the old base was 25% off)
    assert float(((mean - want).abs() / se.clamp_min(1e-12)).max()) < CONTROL_Z_LIMIT


CONTROL_Z_LIMIT = 6.0  # max over ~50 entries of |error| / standard error of a 10-seed mean


def _batch_norm_model(mode):
    torch.manual_seed(1)
    norm = {
        "train": nn.BatchNorm1d(6, affine=False, track_running_stats=False),
        "train-affine": nn.BatchNorm1d(6),
        "eval-no-running-stats": nn.BatchNorm1d(6, track_running_stats=False),
    }[mode]
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double()
    return model.eval() if mode.startswith("eval") else model.train()


@pytest.mark.parametrize("mode", ["train", "train-affine", "eval-no-running-stats"])
def test_a_model_that_couples_the_examples_of_a_batch_is_refused(mode):
    """Batch norm on the batch's statistics: no per-example decomposition (77% off before)."""
    from dense_reference import ref_ggn

    model = _batch_norm_model(mode)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    for method in ("auto", "layers", "vmap"):
        with pytest.raises(ValueError, match=r"statistics of the batch \(1 \(BatchNorm1d\).*eval"):
            ggn_diagonal(model, nn.MSELoss(), (X, y), method=method)
    if mode == "train-affine":  # running statistics: the operator refuses a training-mode model
        return
    G = GGNOperator(model, nn.MSELoss(), (X, y))
    with pytest.warns(UserWarning, match="unit-vector products"):
        est = diagonal(G, method="exact", return_result=True)
    torch.testing.assert_close(
        est.value, torch.diagonal(ref_ggn(model, nn.MSELoss(), X, y)), **DIAG_TOL
    )
    with pytest.raises(ValueError, match="control='ggn'.*statistics of the batch"):
        diagonal(HessianOperator(model, nn.MSELoss(), (X, y)), 10, control="ggn")


def test_batch_norm_with_running_statistics_in_eval_mode_is_per_example():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model.train()(torch.randn(16, 4, dtype=torch.float64))  # some running statistics
    model.eval()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    dense = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), (X, y)).to_dense())
    torch.testing.assert_close(
        ggn_diagonal(model, nn.CrossEntropyLoss(), (X, y)), dense, **DIAG_TOL
    )


def test_a_loss_without_a_factorized_output_hessian():
    """HuberLoss: ggn_diagonal says which losses it takes; diagonal(exact) takes the products."""
    from dense_reference import ref_ggn

    model = tiny(out=2)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss_fn = nn.HuberLoss(delta=0.5)
    with pytest.raises(NotImplementedError, match="HuberLoss is not one of them"):
        ggn_diagonal(model, loss_fn, (X, y))
    with pytest.warns(UserWarning, match="HuberLoss"):
        est = diagonal(GGNOperator(model, loss_fn, (X, y)), method="exact", return_result=True)
    torch.testing.assert_close(est.value, torch.diagonal(ref_ggn(model, loss_fn, X, y)), **DIAG_TOL)
    with pytest.raises(NotImplementedError, match="control='ggn'.*HuberLoss"):
        diagonal(HessianOperator(model, loss_fn, (X, y)), 10, control="ggn")


# ------------------------------------------------------- weighted and ignored targets (mean)
# torch's mean divides by the class weights of the valid targets: the diagonal over batches is
# that of sum_i w_i l_i / sum_i w_i on all the data, each batch counting its share of W


def _weighted_layouts(X, y):
    """One batch; batches of 2 (the second fully ignored), 3 and 4; an unequal split."""
    from torch.utils.data import DataLoader, TensorDataset

    loaders = [DataLoader(TensorDataset(X, y), batch_size=bs) for bs in (2, 3, 4)]
    return [(X, y), *loaders, [(X[:5], y[:5]), (X[5:6], y[5:6]), (X[6:], y[6:])]]


@pytest.mark.parametrize("method", ["auto", "layers", "vmap"])
@pytest.mark.parametrize("loss_name", list(WEIGHTED_LOSSES))
def test_a_weighted_mean_loss_gives_the_dataset_diagonal_however_batched(loss_name, method):
    """Regression: each batch counted n_b / N of its own mean, not W_b / W (3-47% off)."""
    model = tiny()
    X, y = torch.randn(11, 4, dtype=torch.float64), torch.randint(0, 3, (11,))
    y[[2, 3, 7]] = -100
    loss_fn = nn.CrossEntropyLoss(**WEIGHTED_LOSSES[loss_name])
    want = torch.diagonal(_dense_ggn(model, loss_fn, X, y))  # torch's loss on all the data
    for data in _weighted_layouts(X, y):
        G = GGNOperator(model, loss_fn, data)
        torch.testing.assert_close(torch.diagonal(G.to_dense()), want, **DIAG_TOL)
        d = ggn_diagonal(model, loss_fn, data, method=method, chunk_size=2)
        torch.testing.assert_close(d, want, **DIAG_TOL)
        if method == "auto":
            torch.testing.assert_close(diagonal(G, method="exact"), want, **DIAG_TOL)
    # the check is not vacuous: counting each batch by its examples is another diagonal
    halves = [(X[:5], y[:5]), (X[5:], y[5:])]
    parts = [ggn_diagonal(model, loss_fn, b, method=method) for b in halves]
    assert not torch.allclose((5 * parts[0] + 6 * parts[1]) / 11, want, rtol=1e-3)


@pytest.mark.parametrize("method", ["layers", "vmap"])
@pytest.mark.parametrize("loss_name", list(WEIGHTED_LOSSES))
def test_padded_sequences_give_the_diagonal_of_all_the_tokens(loss_name, method):
    from dense_reference import ref_ggn

    # each batch padded (ignore_index) to its own longest sequence: the batches weigh by their
    # valid tokens' class weights, not by their sequences
    model, loss_fn, X, y, batches = padded_sequences(loss_name)
    want = torch.diagonal(ref_ggn(model, loss_fn, X, y))
    torch.testing.assert_close(
        ggn_diagonal(model, loss_fn, batches, method=method), want, **DIAG_TOL
    )


def test_data_whose_every_target_is_ignored_is_refused_clearly():
    model = tiny()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.full((6,), -100)
    for data in [(X, y), [(X[:2], y[:2]), (X[2:], y[2:])]]:
        with pytest.raises(ValueError, match="no weight.*ignore_index"):
            ggn_diagonal(model, nn.CrossEntropyLoss(), data)
    # a sum of no terms is zero, not an error
    d = ggn_diagonal(model, nn.CrossEntropyLoss(reduction="sum"), [(X[:2], y[:2]), (X[2:], y[2:])])
    assert torch.equal(d, torch.zeros_like(d))
