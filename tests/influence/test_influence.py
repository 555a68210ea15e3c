"""Influence's scores, self-influence and top_k against dense float64 references; bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import second
from influence_cases import REG, SCORE_RTOL, data, example_grads_loop, mlp, reference_scores, rel
from second import Influence, exact_hessian

FLOAT32_RTOL = 1e-4  # float32 model, dense method, vs float64 reference


def test_bare_linear_root_mse_and_sum_reduction():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, Y = torch.randn(15, 3, dtype=torch.float64), torch.randn(15, 2, dtype=torch.float64)
    for red in ("mean", "sum"):
        loss_fn = nn.MSELoss(reduction=red)
        inf = Influence(model, loss_fn, (X, Y), damping=REG, progressbar=False)
        H = exact_hessian(loss_fn(model(X), Y), list(model.parameters()))
        G = example_grads_loop(model, loss_fn, X, Y)
        w = 1 / 15 if red == "mean" else 1.0
        ref = w * G[:2] @ torch.linalg.solve(H + REG * torch.eye(8, dtype=H.dtype), G.T)
        assert rel(inf.scores((X[:2], Y[:2])), ref) < SCORE_RTOL["dense"]


def test_float32_model():
    model32 = mlp().float()
    model64 = mlp()
    train, test = data(20), data(2, seed=2)
    ref, *_ = reference_scores(model64, nn.CrossEntropyLoss(), train, test, "ggn", REG)
    tr32 = (train[0].float(), train[1])
    te32 = (test[0].float(), test[1])
    S = Influence(
        model32,
        nn.CrossEntropyLoss(),
        tr32,
        curvature="ggn",
        method="dense",
        damping=REG,
        progressbar=False,
    ).scores(te32)
    assert S.dtype == torch.float32
    assert rel(S.double(), ref) < FLOAT32_RTOL


def test_self_influence_top_k_and_cached_vectors():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(18), data(4, seed=2)
    inf = Influence(
        model, loss_fn, train, curvature="ggn", damping=REG, batch_size=5, progressbar=False
    )
    full = inf.scores(train)  # n x n, only to check the diagonal
    assert rel(inf.self_influence(), torch.diagonal(full)) < SCORE_RTOL["dense"]
    assert bool((inf.self_influence() > 0).all())

    ref, A, _, Gte = reference_scores(model, loss_fn, train, test, "ggn", REG)
    V = inf.inverse_hvps(test)
    assert rel(V, torch.linalg.solve(A, Gte.T).T) < SCORE_RTOL["dense"]
    assert inf.inverse_hvps(test) is V  # kept, not recomputed

    top = inf.top_k(test, k=3)
    S = inf.scores(test)
    for i in range(4):
        order = torch.argsort(S[i], descending=True)
        assert top.helpful_indices[i].tolist() == order[:3].tolist()
        assert top.harmful_indices[i].tolist() == order.flip(0)[:3].tolist()
        assert bool((top.helpful_scores[i] >= top.harmful_scores[i].max()).all())


def test_bad_input_gives_clear_errors():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(10)
    with pytest.raises(ValueError, match="10 examples but targets have 9"):
        Influence(model, loss_fn, (X, y[:9]), progressbar=False)
    with pytest.raises(ValueError, match="empty"):
        Influence(model, loss_fn, (X[:0], y[:0]), progressbar=False)
    with pytest.raises(ValueError, match="empty"):
        Influence(model, loss_fn, [], progressbar=False)
    with pytest.raises(ValueError, match="no parameters"):
        Influence(nn.Sequential(nn.ReLU()), loss_fn, (X, y), progressbar=False)
    with pytest.raises(ValueError, match="curvature must be"):
        Influence(model, loss_fn, (X, y), curvature="hesian")
    with pytest.raises(ValueError, match="method must be"):
        Influence(model, loss_fn, (X, y), method="qr")
    with pytest.raises(ValueError, match="damping"):
        Influence(model, loss_fn, (X, y), damping=-1.0)
    with pytest.raises(ValueError, match="damping"):
        Influence(model, loss_fn, (X, y), damping=float("nan"))
    with pytest.raises(TypeError, match="pair of tensors"):
        Influence(model, loss_fn, [(X,)], progressbar=False)
    inf = Influence(model, loss_fn, (X, y), damping=REG, progressbar=False)
    with pytest.raises(ValueError, match="shapes"):
        inf.scores((torch.randn(2, 5, dtype=torch.float64), y[:2]))
    with pytest.raises(ValueError, match="empty"):
        inf.scores((X[:0], y[:0]))
    with pytest.raises(IndexError, match="outside"):
        inf.newton_loo((X[:1], y[:1]), [10])
    with pytest.raises(ValueError, match="k must be"):
        inf.top_k((X[:1], y[:1]), k=0)
    with pytest.raises(ValueError, match="lowrank"):
        Influence(model, loss_fn, (X, y), method="lowrank", progressbar=False).scores((X, y))


def test_dropout_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    with pytest.raises(second.NonDeterministicDataError, match="eval"):
        Influence(model, nn.CrossEntropyLoss(), data(5))
    model.eval()
    assert Influence(
        model,
        nn.CrossEntropyLoss(),
        data(5),
        curvature="ggn",
        damping=REG,
        progressbar=False,
    ).scores(data(1)).shape == (1, 5)
