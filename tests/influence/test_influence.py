"""Influence functions against dense float64 references and leave-one-out retraining."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import second
from second import Influence, exact_ggn, exact_hessian, per_example_gradients
from second.kfac import EKFACOperator, KFACOperator

# Tolerances (relative error of the whole score matrix unless stated).
SCORE_RTOL = {  # against a dense float64 solve
    "dense": 1e-10,
    "cg": 1e-7,
    "minres": 1e-7,
    "lowrank": 1e-8,  # rank = P: exact up to Lanczos accuracy
    "lissa": 2e-3,  # predicted truncation bias 1e-3 (LiSSA's default tol)
}
FLOAT32_RTOL = 1e-4  # float32 model, dense method, vs float64 reference
APPROX_RTOL = 1e-8  # K-FAC / EK-FAC integration vs their own dense matrix
NEWTON_RTOL = 1e-8  # newton_loo vs a dense float64 reference (and iterative vs dense)
LOO_PEARSON = {"scores": 0.99, "newton_loo": 0.999}  # small logistic regression, exact LOO
LOO_SLOPE_NEWTON = (0.97, 1.03)  # actual / predicted for newton_loo
DIST_RTOL = 1e-10  # 2-process gloo vs single process

REG = 0.1


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def data(n, seed=1, d=3, classes=3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return X, y


def example_grads_loop(model, loss_fn, X, y):
    """Per-example gradients by plain autograd, one example at a time (the reference)."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(X.shape[0]):
        loss = loss_fn(model(X[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def dense_curvature(model, loss_fn, X, y, kind):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(X)
    loss = loss_fn(out, y)
    if kind == "hessian":
        return exact_hessian(loss, params)
    if kind == "ggn":
        return exact_ggn(loss, out, params)
    G = example_grads_loop(model, loss_fn, X, y)
    return G.T @ G / X.shape[0]


def reference_scores(model, loss_fn, train, test, kind, shift):
    X, y = train
    H = dense_curvature(model, loss_fn, X, y, kind)
    A = H + shift * torch.eye(H.shape[0], dtype=H.dtype)
    Gtr = example_grads_loop(model, loss_fn, X, y)
    Gte = example_grads_loop(model, loss_fn, *test)
    return Gte @ torch.linalg.solve(A, Gtr.T) / X.shape[0], A, Gtr, Gte


# ------------------------------------------------------------------------------ accuracy
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


def test_self_influence_iterative_matches_dense():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train = data(12)
    kw = dict(curvature="ggn", damping=REG, progressbar=False)
    d = Influence(model, loss_fn, train, method="dense", **kw).self_influence()
    c = Influence(model, loss_fn, train, method="cg", **kw).self_influence()
    assert rel(c, d) < SCORE_RTOL["cg"]


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_kronecker_curvatures_use_their_own_inverse(curvature):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(20), data(2, seed=2)
    cls = KFACOperator if curvature == "kfac" else EKFACOperator
    K = cls(model, loss_fn, train).to_dense()
    A = K + REG * torch.eye(K.shape[0], dtype=K.dtype)
    Gtr = example_grads_loop(model, loss_fn, *train)
    Gte = example_grads_loop(model, loss_fn, *test)
    ref = Gte @ torch.linalg.solve(A, Gtr.T) / 20
    inf = Influence(model, loss_fn, train, curvature=curvature, damping=REG, progressbar=False)
    assert rel(inf.scores(test), ref) < APPROX_RTOL


# ------------------------------------------------------------------------------ newton_loo
def newton_reference(model, loss_fn, train, test, idx, shift):
    X, y = train
    n = X.shape[0]
    params = list(model.parameters())
    H = exact_hessian(loss_fn(model(X), y), params) + shift * torch.eye(
        sum(p.numel() for p in params), dtype=torch.float64
    )
    out = torch.zeros(test[0].shape[0], len(idx), dtype=torch.float64)
    for k, j in enumerate(idx):
        lj = loss_fn(model(X[j : j + 1]), y[j : j + 1])
        Hj = exact_hessian(lj, params)
        gj = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lj, params)])
        d = torch.linalg.solve(H - Hj / n, gj / n)
        for i in range(test[0].shape[0]):
            lt = loss_fn(model(test[0][i : i + 1]), test[1][i : i + 1])
            gt = torch.cat([g.reshape(-1) for g in torch.autograd.grad(lt, params)])
            Ht = exact_hessian(loss_fn(model(test[0][i : i + 1]), test[1][i : i + 1]), params)
            out[i, k] = gt @ d + 0.5 * d @ Ht @ d
    return out


@pytest.mark.parametrize("method", ["dense", "minres"])
def test_newton_loo_matches_dense_reference(method):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(16), data(2, seed=2)
    idx = [0, 5, 11]
    ref = newton_reference(model, loss_fn, train, test, idx, 1.0)
    inf = Influence(model, loss_fn, train, method=method, damping=1.0, progressbar=False)
    est = inf.newton_loo(test, torch.tensor(idx))
    assert est.shape == (2, 3)
    assert rel(est, ref) < NEWTON_RTOL


@pytest.mark.parametrize("fisher", ["type2", "mc"])
def test_newton_loo_of_a_type2_or_mc_fisher_removes_the_examples_ggn_term(fisher):
    """The leave-one-out curvature drops the example's own term of the matrix: for the type-2
    Fisher (equal to the GGN) and the Monte-Carlo one (whose expectation it is) that term is
    the example's GGN, not its empirical Fisher (the outer product of its gradient)."""
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(16), data(2, seed=2)
    idx = torch.tensor([0, 5, 11])
    ggn = Influence(model, loss_fn, train, curvature="ggn", damping=1.0, progressbar=False)
    ref = ggn.newton_loo(test, idx)
    opts = {"fisher": fisher}
    if fisher == "mc":  # many samples: the MC Fisher near its expectation, the GGN
        opts.update(mc_samples=4000, generator=torch.Generator().manual_seed(0))
    inf = Influence(
        model,
        loss_fn,
        train,
        curvature="fisher",
        curvature_options=opts,
        damping=1.0,
        progressbar=False,
    )
    tol = NEWTON_RTOL if fisher == "type2" else 0.05
    assert rel(inf.newton_loo(test, idx), ref) < tol


def _fit_logistic(X, y, weights, lam, theta0, tol=1e-12):
    """Newton on w-weighted mean logistic loss + lam/2 ||theta||^2 (theta = [w, b])."""
    n = X.shape[0]
    Xa = torch.cat([X, torch.ones(n, 1, dtype=X.dtype)], 1)
    theta = theta0.clone()
    for _ in range(100):
        p = torch.sigmoid(Xa @ theta)
        g = Xa.T @ (weights * (p - y)) / n + lam * theta
        if float(g.norm()) < tol:
            break
        H = (Xa.T * (weights * p * (1 - p))) @ Xa / n + lam * torch.eye(Xa.shape[1], dtype=X.dtype)
        theta = theta - torch.linalg.solve(H, g)
    return theta


def test_leave_one_out_logistic_regression():
    g = torch.Generator().manual_seed(3)
    n, d, lam = 60, 3, 1e-2
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (
        X @ torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
        + 0.8 * torch.randn(n, generator=g, dtype=torch.float64)
        > 0
    ).double()
    Xt = torch.randn(1, d, generator=g, dtype=torch.float64)
    yt = torch.tensor([1.0], dtype=torch.float64)
    theta = _fit_logistic(
        X, y, torch.ones(n, dtype=torch.float64), lam, torch.zeros(d + 1, dtype=torch.float64)
    )
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:d].reshape(1, d))
        model.bias.copy_(theta[d:])

    class Squeeze(nn.Module):
        def forward(self, out, target):
            return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), target)

    loss_fn = Squeeze()
    inf = Influence(model, loss_fn, (X, y), damping=lam, progressbar=False)

    def test_loss(th):
        z = torch.cat([Xt, torch.ones(1, 1, dtype=X.dtype)], 1) @ th
        return float(nn.functional.binary_cross_entropy_with_logits(z, yt))

    base = test_loss(theta)
    actual = []
    for j in range(n):
        w = torch.ones(n, dtype=torch.float64)
        w[j] = 0
        actual.append(test_loss(_fit_logistic(X, y, w, lam, theta)) - base)
    actual = torch.tensor(actual, dtype=torch.float64)
    first = inf.scores((Xt, yt))[0]
    newton = inf.newton_loo((Xt, yt), range(n))[0]
    assert float(torch.corrcoef(torch.stack([first, actual]))[0, 1]) > LOO_PEARSON["scores"]
    assert float(torch.corrcoef(torch.stack([newton, actual]))[0, 1]) > LOO_PEARSON["newton_loo"]
    slope = float(actual @ newton / (newton @ newton))
    assert LOO_SLOPE_NEWTON[0] < slope < LOO_SLOPE_NEWTON[1]
    assert float((newton - actual).abs().max()) < float((first - actual).abs().max())


# ------------------------------------------------------------------------------ cache / resume
def test_interrupted_scores_resume_from_cache(tmp_path, monkeypatch):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(20), data(3, seed=2)
    kw = dict(curvature="ggn", damping=REG, batch_size=4, progressbar=False)
    expected = Influence(model, loss_fn, train, **kw).scores(test)

    inf = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw)
    inf.inverse_hvps(test)
    real = inf.fn.gradients
    calls = []

    def flaky(X, y):
        calls.append(X.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash in the third training chunk")
        return real(X, y)

    monkeypatch.setattr(inf.fn, "gradients", flaky)
    with pytest.raises(KeyboardInterrupt):
        inf.scores(test)
    files = sorted(p.name for p in Path(tmp_path).glob("scores-*.pt"))
    assert len(files) == 2  # two finished chunks, nothing half-written
    assert not list(Path(tmp_path).glob("*.tmp"))

    fresh = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw)
    counted = []
    real2 = fresh.fn.gradients
    monkeypatch.setattr(fresh.fn, "gradients", lambda X, y: counted.append(1) or real2(X, y))
    S = fresh.scores(test)
    assert len(counted) == 3  # the 3 unfinished chunks only; test vectors came from disk
    assert rel(S, expected) < SCORE_RTOL["dense"]
    assert len(list(Path(tmp_path).glob("scores-*.pt"))) == 5


def test_corrupt_cache_file_is_recomputed(tmp_path):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(10), data(2, seed=2)
    kw = dict(curvature="ggn", damping=REG, batch_size=5, progressbar=False)
    S = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw).scores(test)
    for p in Path(tmp_path).glob("scores-*.pt"):
        p.write_bytes(b"not a tensor file")
    (Path(tmp_path) / ".leftover.tmp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="ignoring cache file"):
        again = Influence(model, loss_fn, train, cache_dir=tmp_path, **kw).scores(test)
    assert rel(again, S) < SCORE_RTOL["dense"]


def test_changed_parameters_invalidate_cached_vectors():
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    train, test = data(10), data(2, seed=2)
    inf = Influence(model, loss_fn, train, curvature="ggn", damping=REG, progressbar=False)
    before = inf.scores(test)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    after = inf.scores(test)
    ref, *_ = reference_scores(model, loss_fn, train, test, "ggn", REG)
    assert rel(after, ref) < SCORE_RTOL["dense"]
    assert rel(after, before) > 1e-3


# ------------------------------------------------------------------------------ distributed
WORKER = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from torch import nn
    from second import Influence
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    res = {}
    for method in ("dense", "cg"):
        inf = Influence(model, nn.CrossEntropyLoss(), (X, y), curvature="ggn", method=method,
                        damping=0.1, batch_size=4, progressbar=False)
        res[method] = dict(scores=inf.scores((X[:5], y[:5])), self=inf.self_influence(),
                           loo=inf.newton_loo((X[:2], y[:2]), [1, 7, 20]))
    if rank == 0:
        torch.save(res, out)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort the interpreter's finalization (distributed_cases.py)
    """
)


@pytest.mark.distributed
def test_two_process_gloo_equals_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    out = tmp_path / "res.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), "2", init, str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)
    got = torch.load(out)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (23,), generator=g)
    for method in ("dense", "cg"):
        inf = Influence(
            model,
            nn.CrossEntropyLoss(),
            (X, y),
            curvature="ggn",
            method=method,
            damping=0.1,
            batch_size=4,
            progressbar=False,
        )
        assert rel(got[method]["scores"], inf.scores((X[:5], y[:5]))) < DIST_RTOL
        assert rel(got[method]["self"], inf.self_influence()) < DIST_RTOL
        assert rel(got[method]["loo"], inf.newton_loo((X[:2], y[:2]), [1, 7, 20])) < DIST_RTOL


# ------------------------------------------------------------------------------ bad input
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


def test_newton_loo_falls_back_when_leave_one_out_curvature_is_indefinite():
    # one parameter, per-example loss cos(w x y) with curvature -(x y)^2 cos(w x y): point 0
    # carries all the positive curvature, so removing it leaves H - H_0 / n < 0
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    X = torch.ones(3, 1, dtype=torch.float64)
    y = torch.tensor([[math.pi], [0.5], [0.4]], dtype=torch.float64)

    def loss_fn(out, t):
        return torch.cos(out * t).mean()

    inf = second.Influence(
        model, loss_fn, (X, y), curvature="hessian", method="dense", progressbar=False
    )
    with pytest.warns(second.NegativeCurvatureWarning, match=r"point\(s\) \[0\]"):
        est = inf.newton_loo((X[1:2], y[1:2]), [0, 1, 2])
    assert torch.isfinite(est).all()
    # the positive-definite points still get the Newton step: it differs from first order
    first = inf.scores((X[1:2], y[1:2]))
    assert not torch.allclose(est[0, 1:], first[0, 1:])


@pytest.mark.parametrize(
    "damping",
    [
        np.float32(0.1),
        np.float64(0.1),
        np.array(0.1),
        torch.tensor(0.1),
        torch.tensor(0.1).double(),
    ],
    ids=["np.float32", "np.float64", "np.array0d", "tensor0d", "tensor0d64"],
)
def test_a_real_scalar_damping_of_any_kind(damping):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(12)
    kw = dict(curvature="ggn", method="dense", progressbar=False)
    inf = Influence(model, loss_fn, (X, y), damping=damping, **kw)
    assert isinstance(inf.damping, float)
    assert inf.damping == float(damping)
    plain = Influence(model, loss_fn, (X, y), damping=float(damping), **kw)
    assert torch.equal(inf.scores((X[:2], y[:2])), plain.scores((X[:2], y[:2])))


@pytest.mark.parametrize(
    "damping", [torch.tensor([0.1, 0.2]), np.array([0.1]), True, 1j, "0.1", torch.tensor(-1.0)]
)
def test_a_damping_that_is_not_a_real_scalar_is_refused(damping):
    model, loss_fn = mlp(), nn.CrossEntropyLoss()
    X, y = data(6)
    with pytest.raises(ValueError, match="finite real number >= 0"):
        Influence(model, loss_fn, (X, y), damping=damping)


def test_batch_norm_without_running_statistics_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False))
    model = nn.Sequential(model, nn.Linear(4, 3)).double().eval()
    X, y = data(10)
    with pytest.raises(ValueError, match="batch's statistics.*track_running_stats=False"):
        Influence(model, nn.CrossEntropyLoss(), (X, y), progressbar=False)
    # with running statistics, in eval mode, it is per example: accepted
    ok = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double().eval()
    Influence(ok, nn.CrossEntropyLoss(), (X, y), curvature="ggn", damping=0.1).scores((X, y))
