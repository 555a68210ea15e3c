"""Influence reads any data through second.Task: dict batches, map-style Datasets, a measurement,
several inputs, iterables of batches (influence/_examples.py); per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from influence_cases import NEWTON_RTOL, REG, SCORE_RTOL, data, example_grads_loop, mlp, rel
from second import Influence, Task, exact_ggn, per_example_gradients
from second._errors import SecondDeprecationWarning


class Keyword(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, inputs):
        return self.inner(inputs)


KW = dict(curvature="ggn", damping=0.1, method="dense", progressbar=False, batch_size=4)


def _dense_scores(model, loss_fn, train, test, damping):
    """w g_test^T (G + damping I)^{-1} g_j from autograd, one example at a time."""
    params = list(model.parameters())
    X, y = train
    out = model(X)
    G = exact_ggn(loss_fn(out, y), out, params).detach()

    def grads(Xs, ys):
        rows = []
        for i in range(Xs.shape[0]):
            loss = loss_fn(model(Xs[i : i + 1]), ys[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        return torch.stack(rows)

    A = G + damping * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(A, grads(*test).T).T @ grads(*train).T / X.shape[0]


def test_pairs_dicts_and_a_dataset_give_the_same_scores():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    (X, y), test = data(10), data(3, seed=2)
    expected = _dense_scores(model, loss_fn, (X, y), test, 0.1)
    pairs = Influence(model, loss_fn, [(X[:6], y[:6]), (X[6:], y[6:])], **KW).scores(test)
    torch.testing.assert_close(pairs, expected, rtol=1e-8, atol=1e-10)

    dicts = [{"inputs": X[:6], "labels": y[:6]}, {"inputs": X[6:], "labels": y[6:]}]
    inf = Influence(Keyword(model), loss_fn, dicts, **KW)
    got = inf.scores({"inputs": test[0], "labels": test[1]})
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        inf.newton_loo({"inputs": test[0], "labels": test[1]}, [0, 7]),
        Influence(model, loss_fn, (X, y), **KW).newton_loo(test, [0, 7]),
        rtol=1e-8,
        atol=1e-10,
    )

    ds = Influence(model, loss_fn, TensorDataset(X, y), **KW).scores(TensorDataset(*test))
    torch.testing.assert_close(ds, expected, rtol=1e-8, atol=1e-10)


def test_a_task_measurement_is_what_is_attributed():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(10), data(3, seed=2)

    class Margin(Task):  # attribute the logit of class 0 instead of the test loss
        def measurement(self, model, batch):
            return self.output(model, batch)[:, 0].sum()

    got = Influence(model, loss_fn, train, task=Margin(), **KW).inverse_hvps(test)
    params = list(model.parameters())
    rows = []
    for i in range(3):
        out = model(test[0][i : i + 1])[:, 0].sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out, params)]))
    out = model(train[0])
    G = exact_ggn(loss_fn(out, train[1]), out, params).detach()
    A = G + 0.1 * torch.eye(G.shape[0], dtype=G.dtype)
    torch.testing.assert_close(got, torch.linalg.solve(A, torch.stack(rows).T).T)
    plain = Influence(model, loss_fn, train, **KW).inverse_hvps(test)
    assert not torch.allclose(got, plain)


def test_regularization_is_a_deprecated_part_of_damping():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(10), data(3, seed=2)
    kw = {k: v for k, v in KW.items() if k != "damping"}
    new = Influence(model, loss_fn, train, damping=0.15, **kw)
    match = (
        r"Influence\(regularization=\.\.\.\) is deprecated and stops working in 0\.3: use damping="
    )
    # not a rename: both spellings may be given, and they add (the warning says so)
    with pytest.warns(SecondDeprecationWarning, match=match + r".*added to damping") as rec:
        old = Influence(model, loss_fn, train, regularization=0.1, damping=0.05, **kw)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert old.damping == pytest.approx(0.15) and old.shift == pytest.approx(0.15)
    torch.testing.assert_close(old.scores(test), new.scores(test))
    with pytest.warns(SecondDeprecationWarning, match=match):
        alone = Influence(model, loss_fn, train, regularization=0.15, **kw)
    assert alone.damping == pytest.approx(0.15)
    with pytest.raises(ValueError, match="regularization"):
        Influence(model, loss_fn, train, regularization=-1.0, **kw)


class PerToken(nn.Module):
    """``[n, T, 3] -> [n, 3, T]``: a per-token classifier for any length ``T``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x).transpose(1, 2)


def _tokens(n, T, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n, T), generator=g
    )


@pytest.mark.parametrize("curvature", ["ggn", "kfac"])
def test_sequences_of_another_length_are_scored(curvature):
    torch.manual_seed(0)
    model, loss_fn = PerToken().double(), nn.CrossEntropyLoss()
    short, long = _tokens(8, 5, 1), _tokens(6, 8, 2)
    kw = dict(curvature=curvature, damping=0.1, progressbar=False)
    # padded per batch: the two training batches have different lengths
    inf = Influence(model, loss_fn, [short, long], **kw)
    S = inf.scores(long)
    assert S.shape == (6, 14)
    # the test batch is the second training batch: its self-scores are on the diagonal
    torch.testing.assert_close(torch.diagonal(S[:, 8:]), inf.self_influence()[8:])
    # a test length never seen in training
    assert Influence(model, loss_fn, short, **kw).scores(_tokens(2, 7, 3)).shape == (2, 8)


def test_test_examples_the_model_cannot_run_are_refused_clearly():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(10)
    inf = Influence(model, loss_fn, (X, y), progressbar=False)
    with pytest.raises(ValueError, match="shapes .* fails on them"):
        inf.scores((torch.randn(2, 5, dtype=torch.float64), y[:2]))
    with pytest.raises(ValueError, match="as many dimensions"):
        inf.scores((X[:2, None], y[:2]))


def test_per_example_gradients_match_autograd_loop():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(11)
    G = per_example_gradients(model, loss_fn, X, y, batch_size=4)
    assert rel(G, example_grads_loop(model, loss_fn, X, y)) < 1e-12


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Linear(3, 2), nn.Linear(4, 2), nn.BatchNorm1d(2)

    def forward(self, x, z):
        return self.bn(self.a(x) + self.b(z))


def test_multi_input_model_with_buffers():
    torch.manual_seed(0)
    model = TwoInputs().double().eval()
    X, Z = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (9,))
    loss_fn = nn.CrossEntropyLoss()
    G = per_example_gradients(model, loss_fn, (X, Z), y)
    params = list(model.parameters())
    ref = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(
                        loss_fn(model(X[i : i + 1], Z[i : i + 1]), y[i : i + 1]), params
                    )
                ]
            )
            for i in range(9)
        ]
    )
    assert rel(G, ref) < 1e-12
    out = model(X, Z)
    H = exact_ggn(loss_fn(out, y), out, params)
    A = H + REG * torch.eye(H.shape[0], dtype=H.dtype)
    inf = Influence(model, loss_fn, ((X, Z), y), curvature="ggn", damping=REG, progressbar=False)
    assert rel(inf.scores(((X[:2], Z[:2]), y[:2])), G[:2] @ torch.linalg.solve(A, G.T) / 9) < 1e-10


def test_iterable_of_batches_equals_one_batch():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(20)
    test = data(2, seed=2)
    batches = [(X[i : i + 7], y[i : i + 7]) for i in range(0, 20, 7)]
    a = Influence(model, loss_fn, (X, y), curvature="ggn", damping=REG, progressbar=False)
    b = Influence(
        model,
        loss_fn,
        batches,
        curvature="ggn",
        damping=REG,
        batch_size=3,
        progressbar=False,
    )
    assert rel(b.scores(test), a.scores(test)) < SCORE_RTOL["dense"]
    assert rel(b.newton_loo(test, [4, 17]), a.newton_loo(test, [4, 17])) < NEWTON_RTOL
