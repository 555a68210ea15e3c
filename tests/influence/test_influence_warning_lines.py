"""An Influence's warnings point at the caller's line, whichever method reached them (the
fixed stacklevels landed in _influence.py, _curvature.py or second's solvers)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from influence_cases import REG, data, mlp
from second import ConvergenceWarning, Influence, NegativeCurvatureWarning
from warning_lines import caught_at

KW = dict(progressbar=False)


def _unconverged(method):  # a nearly undamped curvature in two iterations
    curvature = "hessian" if method == "minres" else "ggn"
    return Influence(
        mlp(), nn.CrossEntropyLoss(), data(12), curvature=curvature, method=method,
        damping=1e-6, maxiter=2, **KW,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("entry", ["scores", "inverse_hvps", "self_influence"])
def test_an_unconverged_solve_warns_at_the_callers_line(method, entry):
    inf, test = _unconverged(method), data(2, seed=2)
    call = getattr(inf, entry)
    caught_at(lambda: call() if entry == "self_influence" else call(test), ConvergenceWarning)


@pytest.mark.parametrize("entry", ["scores", "self_influence", "top_k"])
def test_the_dense_inverse_of_an_indefinite_curvature_warns_at_the_callers_line(entry):
    inf = Influence(mlp(), nn.CrossEntropyLoss(), data(24), damping=REG, **KW)
    call = getattr(inf, entry)
    run = (lambda: call()) if entry == "self_influence" else (lambda: call(data(1, seed=2)))
    caught_at(run, NegativeCurvatureWarning, "negative eigenvalue")


@pytest.mark.parametrize("entry", ["scores", "self_influence"])
def test_the_dense_pseudo_inverse_warns_at_the_callers_line(entry):
    X = torch.zeros(4, 3, dtype=torch.float64)
    X[:, 0] = torch.arange(4.0)  # two of three inputs always 0: a singular GGN
    y = torch.zeros(4, 1, dtype=torch.float64)
    inf = Influence(
        nn.Linear(3, 1, bias=False).double(), nn.MSELoss(), (X, y), curvature="ggn", **KW
    )
    run = (
        (lambda: inf.self_influence())
        if entry == "self_influence"
        else (lambda: inf.scores((X[:1], y[:1])))
    )
    caught_at(run, UserWarning, "singular")


def test_a_lowrank_inverses_uncertified_eigenpairs_warn_at_the_callers_line():
    inf = Influence(
        mlp(), nn.CrossEntropyLoss(), data(12), curvature="ggn", method="lowrank", rank=3,
        damping=REG, solver_options={"eig_tol": 1e-300}, **KW,
    )  # fmt: skip
    caught_at(lambda: inf.scores(data(2, seed=2)), ConvergenceWarning, "eigsh")


def _ignored(n, seed):
    X, y = data(n, seed=seed)
    y = y.clone()
    y[0] = -100  # CrossEntropyLoss' ignore_index
    return X, y


@pytest.mark.parametrize("entry", ["scores", "inverse_hvps", "top_k", "kfac scores"])
def test_ignored_test_examples_warn_at_the_callers_line(entry):
    curvature = "kfac" if entry == "kfac scores" else "hessian"
    inf = Influence(mlp(), nn.CrossEntropyLoss(), data(12), curvature=curvature, damping=1.0, **KW)
    call = getattr(inf, entry.split()[-1])
    caught_at(lambda: call(_ignored(2, seed=3)), UserWarning, "ignore_index")


def test_ignored_training_examples_warn_at_the_callers_line():
    make = lambda: Influence(mlp(), nn.CrossEntropyLoss(), _ignored(6, seed=1), **KW)  # noqa: E731
    caught_at(make, UserWarning, "ignore_index")


@pytest.mark.parametrize("entry", ["scores", "self_influence"])
def test_a_rejected_cache_file_warns_at_the_callers_line(tmp_path, entry):
    model, loss_fn, train, test = mlp(), nn.CrossEntropyLoss(), data(12), data(2, seed=2)
    kw = dict(damping=1.0, cache_dir=tmp_path, **KW)
    run = lambda inf: inf.self_influence() if entry == "self_influence" else inf.scores(test)  # noqa: E731
    run(Influence(model, loss_fn, train, **kw))
    for p in Path(tmp_path).rglob("*"):
        if p.is_file():
            p.write_bytes(b"not a tensor file")
    again = Influence(model, loss_fn, train, **kw)
    # run's line, which made the library call; one frame too far is run(again), in this file
    caught = caught_at(lambda: run(again), UserWarning, "ignoring cache file", at=run)
    assert len(caught) >= 2  # the dense curvature's file and the results' files
