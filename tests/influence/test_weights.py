"""Each training example weighs its share W_j / W of torch's mean (class weights, padding).

torch's ``reduction="mean"`` of ``CrossEntropyLoss``/``NLLLoss`` divides by the class
weights of the valid targets, not by ``n``: the training objective is
``sum_j (W_j / W) l_j`` with ``l_j`` the loss of example ``j`` alone and ``W_j`` its class
weight (its number of valid tokens for a padded sequence, 0 when every target is ignored).
Every score is checked against a dense float64 reference built from that objective, and
the weighted logistic regression against actual leave-one-out retraining.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from dense_reference import ref_ggn, ref_hessian, ref_per_example_gradients
from influence_cases import data, mlp, rel
from second import Influence
from second.influence._factors import StreamedEKFAC
from second.kfac import EKFACOperator, KFACOperator

# Tolerances: relative error of the whole result.
DENSE_RTOL = 1e-9  # against the dense float64 reference of the weighted objective
APPROX_RTOL = 1e-9  # K-FAC / EK-FAC against their own operators' dense matrices
# vs actual leave-one-out retraining (measured 0.036 and 0.011; the old 1/n weights: 2.1)
LOO_RTOL = {"scores": 0.08, "newton_loo": 0.03}
STREAMED_RTOL = 1e-12  # streamed EK-FAC vs EKFACOperator (same arithmetic, other order)

DAMPING = 0.1
CLASS_WEIGHTS = torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)
KW = dict(damping=DAMPING, method="dense", progressbar=False)

# the untrained models' Hessians are indefinite: the references invert the same matrix
pytestmark = pytest.mark.filterwarnings("ignore::second.NegativeCurvatureWarning")


def reference(model, loss_fn, train, test, weights, kind="hessian"):
    """``w_j g_test^T (C + damping I)^{-1} g_j``, C the curvature of torch's loss on all of train."""
    X, y = train
    C = (ref_hessian if kind == "hessian" else ref_ggn)(model, loss_fn, X, y)
    A = C + DAMPING * torch.eye(C.shape[0], dtype=C.dtype)
    G = torch.nan_to_num(ref_per_example_gradients(model, loss_fn, X, y)) * (weights > 0)[:, None]
    Gt = ref_per_example_gradients(model, loss_fn, *test)
    return torch.linalg.solve(A, Gt.T).T @ G.T * weights[None, :], A, G


def class_shares(y, cw=CLASS_WEIGHTS):
    W = cw[y]
    return W / W.sum()


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_class_weighted_scores_self_influence_and_top_k(kind):
    model, loss_fn = mlp(), nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
    train, test = data(24), data(3, seed=2)
    w = class_shares(train[1])
    ref, A, G = reference(model, loss_fn, train, test, w, kind)
    inf = Influence(model, loss_fn, train, curvature=kind, **KW)
    S = inf.scores(test)
    assert rel(S, ref) < DENSE_RTOL
    self_ref = w * (G * torch.linalg.solve(A, G.T).T).sum(1)
    assert rel(inf.self_influence(), self_ref) < DENSE_RTOL
    top = inf.top_k(test, k=3)
    assert torch.equal(top.helpful_indices, torch.topk(ref, 3, dim=1).indices)
    # batching does not change anything: each batch weighs W_b / W
    parts = [(train[0][:10], train[1][:10]), (train[0][10:], train[1][10:])]
    S2 = Influence(model, loss_fn, parts, curvature=kind, batch_size=7, **KW).scores(test)
    assert rel(S2, ref) < DENSE_RTOL


def _newton_reference(model, loss_fn, train, test, idx, w, A, kind="hessian"):
    """Dense Newton step on the leave-one-out objective and the second-order test change.

    Example j's term in the curvature is ``w_j H_j`` (Hessian, GGN), and ``n w_j^2 g_j g_j^T``
    in the empirical Fisher (``n sum_j w_j^2 g_j g_j^T``, the FisherOperator's).
    """
    X, y = train
    out = torch.zeros(test[0].shape[0], len(idx), dtype=torch.float64)
    Gt = ref_per_example_gradients(model, loss_fn, *test)
    for k, j in enumerate(idx):
        one = (X[j : j + 1], y[j : j + 1])
        g = ref_per_example_gradients(model, loss_fn, *one)[0]
        if kind == "fisher":
            term = X.shape[0] * w[j] ** 2 * torch.outer(g, g)
        else:
            term = w[j] * (ref_hessian if kind == "hessian" else ref_ggn)(model, loss_fn, *one)
        d = torch.linalg.solve(A - term, w[j] * g)
        for i in range(test[0].shape[0]):
            Ht = ref_hessian(model, loss_fn, test[0][i : i + 1], test[1][i : i + 1])
            out[i, k] = Gt[i] @ d + 0.5 * d @ Ht @ d
    return out


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_class_weighted_newton_loo_matches_dense_reference(kind, method):
    model, loss_fn = mlp(), nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
    train, test = data(20), data(2, seed=2)
    w = class_shares(train[1])
    damping = 2.0  # the untrained model's Hessian is indefinite: keep the steps Newton's
    X, y = train
    if kind == "fisher":
        G = ref_per_example_gradients(model, loss_fn, X, y)
        C = X.shape[0] * (G * (w**2)[:, None]).T @ G
    else:
        C = (ref_hessian if kind == "hessian" else ref_ggn)(model, loss_fn, X, y)
    A = C + damping * torch.eye(C.shape[0], dtype=C.dtype)
    idx = [0, 3, 11]
    ref = _newton_reference(model, loss_fn, train, test, idx, w, A, kind)
    kw = dict(damping=damping, method=method, tol=1e-13, progressbar=False)
    inf = Influence(model, loss_fn, train, curvature=kind, **kw)
    assert rel(inf.newton_loo(test, idx), ref) < DENSE_RTOL


@pytest.mark.parametrize("curvature,cls", [("kfac", KFACOperator), ("ekfac", EKFACOperator)])
def test_class_weighted_kronecker_scores(curvature, cls):
    model, loss_fn = mlp(), nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
    train, test = data(24), data(3, seed=2)
    parts = [(train[0][:9], train[1][:9]), (train[0][9:], train[1][9:])]
    w = class_shares(train[1])
    B = cls(model, loss_fn, parts).to_dense()
    A = B + DAMPING * torch.eye(B.shape[0], dtype=B.dtype)
    G = ref_per_example_gradients(model, loss_fn, *train)
    Gt = ref_per_example_gradients(model, loss_fn, *test)
    ref = torch.linalg.solve(A, Gt.T).T @ G.T * w[None, :]
    inf = Influence(model, loss_fn, parts, curvature=curvature, damping=DAMPING, progressbar=False)
    assert rel(inf.scores(test), ref) < APPROX_RTOL
    self_ref = w * (G * torch.linalg.solve(A, G.T).T).sum(1)
    assert rel(inf.self_influence(), self_ref) < APPROX_RTOL


class Tokens(nn.Module):
    """A per-token classifier: ``[n, T, 3] -> [n, C, T]``."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return self.lin(torch.tanh(x)).transpose(1, 2)


def padded_tokens(n=12, T=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, T, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n, T), generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    y[torch.arange(T)[None, :] >= lengths[:, None]] = -100
    y[2] = -100  # an example whose every token is padding
    return X, y


@pytest.mark.parametrize("curvature", ["hessian", "kfac", "ekfac"])
def test_padded_sequences_weigh_their_valid_tokens(curvature):
    torch.manual_seed(0)
    model, loss_fn = Tokens().double(), nn.CrossEntropyLoss()
    X, y = padded_tokens()
    valid = (y != -100).sum(1).double()
    w = valid / valid.sum()
    test = (X[:3], y[:3].clamp_min(0))
    with pytest.warns(UserWarning, match="ignore_index"):
        inf = Influence(model, loss_fn, (X, y), curvature=curvature, damping=DAMPING)
    S = inf.scores(test)
    if curvature == "hessian":
        ref, _, _ = reference(model, loss_fn, (X, y), test, w)
    else:
        cls = KFACOperator if curvature == "kfac" else EKFACOperator
        B = cls(model, loss_fn, (X, y)).to_dense()
        A = B + DAMPING * torch.eye(B.shape[0], dtype=B.dtype)
        G = torch.nan_to_num(ref_per_example_gradients(model, loss_fn, X, y))
        Gt = ref_per_example_gradients(model, loss_fn, *test)
        ref = torch.linalg.solve(A, Gt.T).T @ G.T * w[None, :]
    assert rel(S, ref) < (DENSE_RTOL if curvature == "hessian" else APPROX_RTOL)
    assert bool((S[:, 2] == 0).all())


def test_ignored_examples_leave_the_mean_to_the_others():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    (X, y), test = data(40), data(3, seed=2)
    y = y.clone()
    y[:10] = -100
    w = (y != -100).double() / 30
    ref, _, _ = reference(model, loss_fn, (X, y), test, w)
    with pytest.warns(UserWarning, match="ignore_index"):
        inf = Influence(model, loss_fn, (X, y), **KW)
    S = inf.scores(test)
    assert rel(S, ref) < DENSE_RTOL
    assert bool((S[:, :10] == 0).all())


@pytest.mark.parametrize("curvature", ["hessian", "kfac"])
def test_class_weight_zero_has_zero_influence(curvature):
    model = mlp()
    cw = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss(weight=cw)
    (X, y), test = data(30), data(3, seed=2)
    test = (test[0], torch.tensor([0, 2, 1]))  # a test example of class weight 0 too
    zero = y == 2
    with pytest.warns(UserWarning, match="class weight 0"):
        inf = Influence(model, loss_fn, (X, y), curvature=curvature, damping=DAMPING)
    with pytest.warns(UserWarning, match=r"1 test data example\(s\) \(first: \[1\]\)"):
        S = inf.scores(test)
    assert bool((S[:, zero] == 0).all()) and bool((S[1] == 0).all())
    assert bool(torch.isfinite(S).all())
    assert bool((inf.self_influence()[zero] == 0).all())
    if curvature == "hessian":
        ref, _, _ = reference(model, loss_fn, (X, y), test, class_shares(y, cw))
        keep = [0, 2]
        assert rel(S[keep], ref[keep]) < DENSE_RTOL
        loo = inf.newton_loo(test, torch.nonzero(zero)[:2, 0])
        assert bool((loo == 0).all())


def test_every_training_target_ignored_is_refused():
    model = mlp()
    X, y = data(6)
    with pytest.raises(ValueError, match="nothing to attribute"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Influence(model, nn.CrossEntropyLoss(), (X, torch.full_like(y, -100)), progressbar=False)


def test_unweighted_examples_weigh_exactly_one_over_n():
    model = mlp()
    X, y = data(30)
    inf = Influence(model, nn.CrossEntropyLoss(), (X, y), progressbar=False)
    assert inf.weight == 1.0 / 30 and bool((inf.weights == 1.0 / 30).all())
    Xs, ys = torch.randn(7, 5, 3, dtype=torch.float64), torch.randint(0, 4, (7, 5))
    tok = Influence(Tokens().double(), nn.CrossEntropyLoss(), (Xs, ys), progressbar=False)
    assert tok.weight == 1.0 / 7
    s = Influence(model, nn.CrossEntropyLoss(reduction="sum"), (X, y), progressbar=False)
    assert s.weight == 1.0


@pytest.mark.parametrize("loss_kind", ["weighted", "tokens"])
def test_streamed_ekfac_weighs_batches_as_ekfac_operator(loss_kind, tmp_path):
    if loss_kind == "weighted":
        model, loss_fn = mlp(), nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
        X, y = data(20)
    else:
        torch.manual_seed(0)
        model, loss_fn = Tokens().double(), nn.CrossEntropyLoss()
        X, y = padded_tokens(n=10)
    parts = [(X[:7], y[:7]), (X[7:], y[7:])]
    expected = EKFACOperator(model, loss_fn, parts).to_dense()
    assert rel(StreamedEKFAC(model, loss_fn, parts).to_dense(), expected) < STREAMED_RTOL
    # the factors restored from a cache keep the weighting (N / W is stored with them)
    kw = dict(curvature="ekfac", damping=DAMPING, progressbar=False, cache_dir=tmp_path)
    test = (X[:2], y[:2].clamp_min(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = Influence(model, loss_fn, parts, **kw).scores(test)
        again = Influence(model, loss_fn, parts, **kw)
        assert rel(again.operator.to_dense(), expected) < STREAMED_RTOL
        assert rel(again.scores(test), first) < STREAMED_RTOL


def test_weighted_logistic_regression_matches_leave_one_out_retraining():
    """Trained to optimum with L2; retraining without j keeps torch's normalization W."""
    n, lam = 100, 0.05
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    cw = CLASS_WEIGHTS
    W = float(cw[y].sum())
    Xt, yt = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,))

    def fit(model, keep):
        opt = torch.optim.LBFGS(
            model.parameters(),
            max_iter=500,
            tolerance_grad=1e-13,
            tolerance_change=0,
            line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            data_term = nn.functional.cross_entropy(
                model(X[keep]), y[keep], weight=cw, reduction="sum"
            )
            loss = data_term / W + lam / 2 * sum((p**2).sum() for p in model.parameters())
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        return model

    torch.manual_seed(0)
    model = fit(nn.Linear(3, 3).double(), torch.ones(n, dtype=torch.bool))

    def test_losses(m):
        with torch.no_grad():
            return nn.functional.cross_entropy(m(Xt), yt, reduction="none")

    base = test_losses(model)
    idx = [0, 1, 2, 3, 5, 8, 13, 21]
    actual = torch.zeros(4, len(idx), dtype=torch.float64)
    for k, j in enumerate(idx):
        keep = torch.ones(n, dtype=torch.bool)
        keep[j] = False
        actual[:, k] = test_losses(fit(copy.deepcopy(model), keep)) - base
    inf = Influence(model, nn.CrossEntropyLoss(weight=cw), (X, y), **{**KW, "damping": lam})
    assert rel(inf.scores((Xt, yt))[:, idx], actual) < LOO_RTOL["scores"]
    assert rel(inf.newton_loo((Xt, yt), idx), actual) < LOO_RTOL["newton_loo"]
