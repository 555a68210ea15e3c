"""The curvature an Influence inverts: the task's, with the loss' own reduction."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from dense_reference import ref_per_example_gradients
from influence_cases import rel
from second import Influence, Task

# Tolerances: relative error of the whole score matrix against a dense float64 reference.
DENSE_RTOL = 1e-9
DAMPING = 0.1


class Scaled(Task):
    """The output is three times the module's (a temperature applied outside the module)."""

    def output(self, model, batch):
        return 3.0 * model(batch[0])


def _flat(model):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, o = {}, 0
        for k, s in zip(names, shapes):
            m = s.numel()
            out[k] = t[o : o + m].reshape(s)
            o += m
        return out

    return theta, unflat


def scaled_reference(model, loss_fn, train, test, kind):
    """Scores of the objective ``loss_fn(3 f(X), y)``: dense Hessian, GGN or empirical Fisher."""
    theta, unflat = _flat(model)
    X, y = train

    def loss(t, Xb, yb):
        return loss_fn(3.0 * functional_call(model, unflat(t), (Xb,)), yb)

    def per_example(Xs, ys):
        return torch.stack(
            [grad(loss)(theta, Xs[i : i + 1], ys[i : i + 1]) for i in range(len(Xs))]
        )

    G, Gt = per_example(X, y), per_example(*test)
    if kind == "hessian":
        C = hessian(loss)(theta, X, y)
    elif kind == "ggn":
        out = 3.0 * model(X).detach()
        H_out = hessian(lambda o: loss_fn(o, y))(out).reshape(out.numel(), out.numel())
        J = torch.func.jacrev(lambda t: 3.0 * functional_call(model, unflat(t), (X,)))(theta)
        J = J.reshape(out.numel(), -1)
        C = J.T @ H_out @ J
    else:
        C = G.T @ G / X.shape[0]
    A = C + DAMPING * torch.eye(C.shape[0], dtype=C.dtype)
    return torch.linalg.solve(A, Gt.T).T @ G.T / X.shape[0]


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_a_custom_task_sets_every_curvature(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    loss_fn = nn.MSELoss()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(20, 2, generator=g)
    y = y.double()
    test = (X[:3], y[:3])
    ref = scaled_reference(model, loss_fn, (X, y), test, kind)
    inf = Influence(
        model, loss_fn, (X, y), task=Scaled(), curvature=kind, damping=DAMPING, method="dense"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an indefinite Hessian is warned about
        assert rel(inf.scores(test), ref) < DENSE_RTOL


def test_dict_batches_with_another_target_key_reach_the_operator():
    class Keyed(Task):
        def output(self, model, batch):
            return model(batch["inp"])

    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 1).double(), nn.MSELoss()
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    inf = Influence(
        model,
        loss_fn,
        {"inp": X, "tgt": y},
        task=Keyed(target_key="tgt"),
        damping=DAMPING,
        method="dense",
    )
    S = inf.scores({"inp": X[:2], "tgt": y[:2]})
    plain = Influence(model, loss_fn, (X, y), damping=DAMPING, method="dense").scores(
        (X[:2], y[:2])
    )
    assert rel(S, plain) < DENSE_RTOL


def summed(out, target):
    return ((out - target) ** 2).sum()


def sum_reference(model, X, y, test):
    """``g_test^T (H + damping I)^{-1} g_j`` for the summed loss (every example weighs 1)."""
    theta, unflat = _flat(model)

    def loss(t, Xb, yb):
        return summed(functional_call(model, unflat(t), (Xb,)), yb)

    H = hessian(loss)(theta, X, y)
    G = ref_per_example_gradients(model, summed, X, y)
    Gt = ref_per_example_gradients(model, summed, *test)
    A = H + DAMPING * torch.eye(H.shape[0], dtype=H.dtype)
    return torch.linalg.solve(A, Gt.T).T @ G.T


@pytest.mark.parametrize("batches", [1, 2])
def test_a_plain_summing_function_is_warned_and_reduction_sum_is_exact(batches):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(25, 3, dtype=torch.float64), torch.randn(25, 2, dtype=torch.float64)
    data = (X, y) if batches == 1 else [(X[:10], y[:10]), (X[10:], y[10:])]
    test = (X[:3], y[:3])
    kw = dict(damping=DAMPING, method="dense", progressbar=False)
    with pytest.warns(UserWarning, match="looks like a sum") as record:
        Influence(model, summed, data, **kw).scores(test)
    assert len([w for w in record if "looks like a sum" in str(w.message)]) == 1  # once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared: no warning
        S = Influence(model, summed, data, reduction="sum", **kw).scores(test)
    assert rel(S, sum_reference(model, X, y, test)) < DENSE_RTOL


def test_a_reduction_that_contradicts_the_loss_is_refused():
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="contradicts"):
        Influence(model, nn.MSELoss(), (X, y), reduction="sum")
    with pytest.raises(ValueError, match="reduction must be"):
        Influence(model, summed, (X, y), reduction="none")


def test_a_plain_mean_function_is_not_warned():
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf = Influence(model, lambda o, t: ((o - t) ** 2).mean(), [(X[:4], y[:4]), (X[4:], y[4:])])
        inf.scores((X[:2], y[:2]))
