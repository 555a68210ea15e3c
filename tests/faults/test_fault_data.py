"""Data faults: shuffled loaders for every influence curvature, non-finite examples,
ignored targets, and random generators an operator must not touch (docs/reliability.md).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from second import (
    FisherOperator,
    Influence,
    NonDeterministicDataError,
    NonFiniteError,
    diagonal,
    per_example_gradients,
    trace,
)
from second.kfac import EKFACOperator, KFACOperator

REG = 0.1
CURVATURES = [  # (curvature, method): every curvature, each inverse kind
    ("hessian", "dense"),
    ("hessian", "minres"),
    ("ggn", "dense"),
    ("ggn", "cg"),
    ("ggn", "lowrank"),
    ("fisher", "cg"),
    ("kfac", "auto"),
    ("ekfac", "auto"),
]


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


TRAIN, TEST = data(16), data(3, seed=2)


def influence(train, curvature="ggn", method="dense", **kw):
    kw = {"damping": REG + (1.0 if curvature == "hessian" else 0.0), **kw}
    return Influence(
        mlp(),
        nn.CrossEntropyLoss(),
        train,
        curvature=curvature,
        method=method,
        progressbar=False,
        **kw,
    )


def loader(shuffle, batch_size=4, data=TRAIN):
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=shuffle)


# ---------------------------------------------------------------------------- shuffling
@pytest.mark.parametrize(("curvature", "method"), CURVATURES)
def test_a_shuffled_training_loader_raises_for_every_curvature(curvature, method):
    inf = influence(loader(shuffle=True), curvature, method, rank=8)
    with pytest.raises(NonDeterministicDataError, match="shuffl"):
        inf.scores(TEST)


@pytest.mark.parametrize("curvature", ["ggn", "kfac"])
def test_a_loader_permuting_within_its_one_batch_raises(curvature):
    """Sums over a batch do not see a permutation; influence columns do."""
    inf = influence(loader(shuffle=True, batch_size=16), curvature)
    with pytest.raises(NonDeterministicDataError):
        inf.scores(TEST)


def test_a_shuffled_test_loader_raises():
    inf = influence(TRAIN)
    with pytest.raises(NonDeterministicDataError, match="test data"):
        inf.scores(loader(shuffle=True, batch_size=1, data=data(6, seed=3)))


@pytest.mark.parametrize("curvature", ["ggn", "kfac"])
def test_a_fixed_order_loader_gives_the_one_batch_answer(curvature):
    a = influence(TRAIN, curvature).scores(TEST)
    b = influence(loader(shuffle=False), curvature).scores(TEST)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_test_input_raises_naming_it(value):
    X, y = data(4, seed=2)
    X[2, 0] = value
    inf = influence(TRAIN)
    with pytest.raises(NonFiniteError, match=r"test example\(s\) \[2\]"):
        inf.scores((X, y))
    with pytest.raises(NonFiniteError):
        inf.top_k((X, y), k=2)


def test_a_non_finite_training_input_raises():
    X, y = data(16)
    X[5, 1] = float("nan")
    with pytest.raises(NonFiniteError):
        influence((X, y), method="cg").scores(TEST)


def test_scores_refuse_a_non_finite_training_gradient_naming_it(monkeypatch):
    inf = influence(TRAIN, batch_size=8)
    inf.inverse_hvps(TEST)
    real = inf.fn.gradients

    def poisoned(X, y):
        G = real(X, y)
        if G.shape[0] == 8 and torch.equal(X, TRAIN[0][8:]):
            G[3, 0] = float("nan")
        return G

    monkeypatch.setattr(inf.fn, "gradients", poisoned)
    with pytest.raises(NonFiniteError, match=r"training example\(s\) \[11\]"):
        inf.scores(TEST)


def test_per_example_gradients_refuse_non_finite_rows():
    X, y = data(7)
    X[4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"example\(s\) \[4\]"):
        per_example_gradients(mlp(), nn.CrossEntropyLoss(), X, y, batch_size=3)


def test_diagonal_with_no_probe_raises_like_trace():
    A = torch.eye(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="num_matvecs"):
        trace(A, 0, method="hutchinson")
    with pytest.raises(ValueError, match="num_matvecs"):
        diagonal(A, 0)


def test_ignored_targets_are_warned_about_and_score_zero():
    X, y = data(16)
    y[[2, 9]] = -100  # CrossEntropyLoss's ignore_index
    with pytest.warns(UserWarning, match=r"2 training data example\(s\) \(first: \[2, 9\]\)"):
        inf = influence((X, y))
    S = inf.scores(TEST)
    assert bool((S[:, [2, 9]] == 0).all()) and bool((S.abs().sum(0) > 0).sum() == 14)


def test_ignored_test_targets_are_warned_about():
    X, y = data(3, seed=2)
    y[1] = -100
    with pytest.warns(UserWarning, match=r"1 test data example\(s\) \(first: \[1\]\)"):
        influence(TRAIN).scores((X, y))


def test_sequence_targets_with_some_ignored_positions_are_not_warned_about():
    """Padding inside an example is ordinary; only an example with no target left is flagged."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.Unflatten(1, (3, 2))
    ).double()  # 3 classes x 2 positions
    X = torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (8, 2))
    y[0, 1] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Influence(model, nn.CrossEntropyLoss(), (X, y), damping=REG, progressbar=False)


# ---------------------------------------------------------------------------- generators
@pytest.mark.parametrize(
    "make",
    [
        lambda g: FisherOperator(mlp(), nn.CrossEntropyLoss(), TRAIN, fisher="mc", generator=g),
        lambda g: KFACOperator(mlp(), nn.CrossEntropyLoss(), TRAIN, fisher="mc", generator=g),
        lambda g: EKFACOperator(mlp(), nn.CrossEntropyLoss(), TRAIN, fisher="mc", generator=g),
    ],
    ids=["fisher-mc", "kfac-mc", "ekfac-mc"],
)
def test_operators_never_touch_the_users_generator(make):
    g = torch.Generator().manual_seed(123)
    state = g.get_state()
    op = make(g)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    first = op @ v
    assert torch.equal(g.get_state(), state)  # neither advanced nor reset
    x = torch.rand(3, generator=g)  # the user keeps drawing ...
    torch.testing.assert_close(op @ v, first, rtol=0, atol=0)  # ... the operator is one matrix
    assert not torch.equal(torch.rand(3, generator=g), x)  # and its stream went on, not reset


def test_the_generator_state_seeds_the_samples():
    def F(seed):
        return FisherOperator(
            mlp(),
            nn.CrossEntropyLoss(),
            TRAIN,
            fisher="mc",
            generator=torch.Generator().manual_seed(seed),
        ).to_dense()

    torch.testing.assert_close(F(5), F(5), rtol=0, atol=0)
    assert not torch.allclose(F(5), F(6))
