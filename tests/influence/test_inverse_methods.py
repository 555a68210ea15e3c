"""Each way an Influence applies the inverse curvature (influence/_inverse.py): dense, cg,
minres, lissa and lowrank against a dense float64 solve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import second
from influence_cases import REG, SCORE_RTOL, data, mlp, reference_scores, rel
from second import Influence

CASES = [  # (curvature, method): the Hessian of an untrained net is indefinite, so MINRES
    ("hessian", "dense"),
    ("hessian", "minres"),
    ("ggn", "dense"),
    ("ggn", "cg"),
    ("ggn", "lowrank"),
    ("ggn", "lissa"),
    ("fisher", "dense"),
]
SHIFT = {"hessian": 1.0, "ggn": REG, "fisher": REG}  # makes every damped curvature definite


@pytest.mark.parametrize(("curvature", "method"), CASES)
def test_scores_match_dense_reference(curvature, method):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(24), data(2, seed=2)
    ref, *_ = reference_scores(model, loss_fn, train, test, curvature, SHIFT[curvature] + 0.01)
    inf = Influence(
        model,
        loss_fn,
        train,
        curvature=curvature,
        method=method,
        damping=SHIFT[curvature] + 0.01,
        rank=200,
        progressbar=False,
    )
    S = inf.scores(test)
    assert S.shape == (2, 24)
    assert rel(S, ref) < SCORE_RTOL[method]


def test_indefinite_hessian_warns():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    inf = Influence(model, loss_fn, data(24), damping=REG, progressbar=False)
    with pytest.warns(second.NegativeCurvatureWarning, match="negative eigenvalue"):
        inf.scores(data(1, seed=2))


def test_self_influence_iterative_matches_dense():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train = data(12)
    kw = dict(curvature="ggn", damping=REG, progressbar=False)
    d = Influence(model, loss_fn, train, method="dense", **kw).self_influence()
    c = Influence(model, loss_fn, train, method="cg", **kw).self_influence()
    assert rel(c, d) < SCORE_RTOL["cg"]


def test_lowrank_harmonic_complement_passes_through_solver_options():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(24), data(2, seed=2)
    ref, A, *_ = reference_scores(model, loss_fn, train, test, "ggn", REG)
    C = A - REG * torch.eye(A.shape[0], dtype=A.dtype)
    errs = {}
    for complement in ("zero", "harmonic", "weighted"):
        inf = Influence(
            model,
            loss_fn,
            train,
            curvature="ggn",
            method="lowrank",
            damping=REG,
            rank=5,
            solver_options={"complement": complement, "complement_probes": 20},
            progressbar=False,
        )
        errs[complement] = rel(inf.scores(test), ref)
        c = inf.inverse.inverse.complement_eigenvalue
        direct = second.solvers.lowrank_inverse(
            C, 5, REG, eig_tol=1e-6, complement=complement, complement_probes=20
        )
        assert abs(c - direct.complement_eigenvalue) <= 1e-6 * max(c, 1e-12)
    assert c > 0
    assert max(errs["harmonic"], errs["weighted"]) < errs["zero"]
