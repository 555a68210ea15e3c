"""Data-parallel curvature products: 2 gloo processes on CPU, each with a shard of the data.

One spawn runs every check (starting processes dominates the cost); each rank
writes its results to a file and the parent compares them with the
single-process operators on all the data.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from conftest import PRODUCT_TOL
from dense_reference import assert_close
from distributed_cases import spawn_ranks
from second import FisherOperator, GGNOperator, HessianOperator

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
N_DATA = 11
SHARDS = [(0, 4), (4, 11)]  # unequal shards: the mean must be weighted by example counts
KINDS = {"hessian": HessianOperator, "ggn": GGNOperator, "ef": FisherOperator}
# "weighted": class weights, and ignored targets making rank 0's first batch weigh nothing;
# "ignored-shard": every target of rank 0's shard is ignored (mean losses, weighed by the
# class weights of the valid targets on all ranks)
LOSSES = ("mean", "sum", "weighted", "ignored-shard")


def _problem(reduction: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(N_DATA, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (N_DATA,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    V = torch.randn(v.shape[0], 3, dtype=torch.float64)
    if reduction == "weighted":
        y[[0, 6]] = -100
        loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64))
    elif reduction == "ignored-shard":
        y[: SHARDS[0][1]] = -100
        loss_fn = nn.CrossEntropyLoss()
    else:
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return model, loss_fn, X, y, v, V


def _products(model, loss_fn, data, v, V, **kw) -> dict:
    out = {}
    for name, cls in KINDS.items():
        op = cls(model, loss_fn, data, **kw)
        out[f"{name} v"] = op @ v
        out[f"{name} V"] = op @ V
        if name == "ggn":
            loss, g = op.loss_and_gradient()
            out["loss"], out["gradient"] = loss, g
            out["num_data"] = torch.tensor(op.num_data)
    return out


def _worker(rank: int, world: int, outdir: str) -> None:
    results = {}
    for reduction in LOSSES:
        model, loss_fn, X, y, v, V = _problem(reduction)
        lo, hi = SHARDS[rank]
        Xs, ys = X[lo:hi], y[lo:hi]
        # the shard as one batch, and as several unequal batches
        results[reduction, "batch"] = _products(model, loss_fn, (Xs, ys), v, V)
        batches = [(Xs[:1], ys[:1]), (Xs[1:], ys[1:])]
        results[reduction, "batches"] = _products(model, loss_fn, batches, v, V)
        # opting out keeps the product local to the shard
        if reduction != "ignored-shard":
            results[reduction, "local"] = _products(
                model, loss_fn, (Xs, ys), v, V, distributed=False
            )
    torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist"))
    spawn_ranks(_worker, WORLD_SIZE, outdir)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("layout", ["batch", "batches"])
@pytest.mark.parametrize("reduction", LOSSES)
def test_sharded_products_equal_single_process(rank_results, reduction, layout):
    model, loss_fn, X, y, v, V = _problem(reduction)
    expected = _products(model, loss_fn, (X, y), v, V)
    tol = PRODUCT_TOL[torch.float64]
    for rank, results in enumerate(rank_results):
        got = results[reduction, layout]
        assert set(got) == set(expected)
        for key in expected:
            assert_close(got[key], expected[key], tol, msg=f"rank {rank}: {key}")
        assert int(got["num_data"]) == N_DATA


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distributed_false_keeps_the_shard_local(rank_results, reduction):
    model, loss_fn, X, y, v, V = _problem(reduction)
    tol = PRODUCT_TOL[torch.float64]
    for rank, results in enumerate(rank_results):
        lo, hi = SHARDS[rank]
        expected = _products(model, loss_fn, (X[lo:hi], y[lo:hi]), v, V)
        got = results[reduction, "local"]
        for key in expected:
            assert_close(got[key], expected[key], tol, msg=f"rank {rank}: {key}")
        assert int(got["num_data"]) == hi - lo


# --- half precision: the example counts are reduced in float64 ----------------------------

HALF_SHARDS = {"bf16": (torch.bfloat16, [301, 258]), "fp16": (torch.float16, [40_000, 40_001])}
# Tolerance: a half-precision product summed over ranks against one process on the union
# (float32 accumulation on both sides; only the summation order differs).
HALF_RTOL = 1e-2


def _half_data(dtype, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g).to(dtype), torch.randn(n, 2, generator=g).to(dtype)


def _half_model(dtype):
    torch.manual_seed(0)
    return nn.Linear(3, 2).to(dtype)


def _half_worker(rank: int, world: int, outdir: str) -> None:
    from second import KFACOperator

    out = {}
    for name, (dtype, sizes) in HALF_SHARDS.items():
        data = [_half_data(dtype, sizes[rank], rank)]
        G = GGNOperator(_half_model(dtype), nn.MSELoss(), data)
        out[name] = (G @ torch.ones(8, dtype=dtype)).float()
        out[name + " num_data"] = G.num_data
        K = KFACOperator(_half_model(dtype), nn.MSELoss(), data)
        out[name + " kfac num_data"] = K.num_data
        out[name + " kfac"] = [f.float() for f in (*K.A, *K.G)]
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def half_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist_half"))
    spawn_ranks(_half_worker, WORLD_SIZE, outdir)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", list(HALF_SHARDS))
def test_half_precision_counts_are_exact_over_ranks(half_results, name):
    """Regression: counts packed in bfloat16 rounded 559 to 560; in float16 80001 overflowed."""
    from second import KFACOperator

    dtype, sizes = HALF_SHARDS[name]
    data = [_half_data(dtype, sizes[r], r) for r in range(WORLD_SIZE)]
    G = GGNOperator(_half_model(dtype), nn.MSELoss(), data)
    want = (G @ torch.ones(8, dtype=dtype)).float()
    K = KFACOperator(_half_model(dtype), nn.MSELoss(), data)
    factors = [f.float() for f in (*K.A, *K.G)]
    for res in half_results:
        assert res[name + " num_data"] == sum(sizes)
        assert res[name + " kfac num_data"] == sum(sizes)
        torch.testing.assert_close(res[name], want, rtol=HALF_RTOL, atol=0.0)
        for got, ref in zip(res[name + " kfac"], factors, strict=True):
            torch.testing.assert_close(
                got, ref, rtol=HALF_RTOL, atol=HALF_RTOL * float(ref.abs().max())
            )


# --- Monte-Carlo Fisher: independent samples per rank --------------------------------------


def _mc_worker(rank: int, world: int, outdir: str) -> None:
    from second import KFACOperator

    model, loss_fn, X, y = _problem("mean")[:4]
    data = (X, y)  # the same data on every rank: only the samples can differ
    F = FisherOperator(model, loss_fn, data, fisher="mc", distributed=False)
    out = {"fisher": F.to_dense()}
    out["fisher shared"] = FisherOperator(model, loss_fn, data, fisher="mc").to_dense()
    out["kfac shared"] = KFACOperator(model, loss_fn, data, fisher="mc").to_dense()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


def test_monte_carlo_samples_differ_per_rank(tmp_path):
    """Regression: every rank drew the same Monte-Carlo targets (seed 0 everywhere)."""
    from second import KFACOperator

    spawn_ranks(_mc_worker, WORLD_SIZE, str(tmp_path))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    model, loss_fn, X, y = _problem("mean")[:4]
    one = FisherOperator(model, loss_fn, (X, y), fisher="mc").to_dense()
    # distributed=False: rank 0 keeps the samples of one process
    assert_close(res[0]["fisher"], one, PRODUCT_TOL[torch.float64])
    for key in ("fisher shared", "kfac shared"):
        # summed over ranks: both ranks agree, and it is not one rank's draw twice
        assert_close(res[1][key], res[0][key], PRODUCT_TOL[torch.float64])
    assert not torch.allclose(res[0]["fisher shared"], one)
    assert not torch.allclose(
        res[0]["kfac shared"], KFACOperator(model, loss_fn, (X, y), fisher="mc").to_dense()
    )


# --- an empty shard: it adds nothing; data empty on every rank: every rank raises ----------


def _empty_shard_worker(rank: int, world: int, outdir: str) -> None:
    from second import KFACOperator

    model, loss_fn, X, y, v, V = _problem("mean")
    out: dict = {}
    empties = {"list": [], "batch": (X[:0], y[:0]), "empty batches": [(X[:0], y[:0])]}
    for layout, empty in empties.items():
        data = [(X[:5], y[:5]), (X[5:], y[5:])] if rank == 0 else empty
        out[layout] = _products(model, loss_fn, data, v, V)
        out[layout]["kfac"] = KFACOperator(model, loss_fn, data).to_dense()
    errors = {}
    for name, make in {**KINDS, "kfac": KFACOperator}.items():
        try:
            make(model, loss_fn, []) @ v
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


def test_empty_shard_adds_nothing_and_all_empty_fails_everywhere(tmp_path):
    """Regression: a rank with an empty shard raised at once while its peers hung."""
    from second import KFACOperator

    spawn_ranks(_empty_shard_worker, WORLD_SIZE, str(tmp_path))
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    model, loss_fn, X, y, v, V = _problem("mean")
    expected = _products(model, loss_fn, (X, y), v, V)
    expected["kfac"] = KFACOperator(model, loss_fn, (X, y)).to_dense()
    tol = PRODUCT_TOL[torch.float64]
    for rank, results in enumerate(res):
        for layout in ("list", "batch", "empty batches"):
            for key in expected:
                got = results[layout][key]
                assert_close(got, expected[key], tol, msg=f"rank {rank} {layout}: {key}")
        # no example on any rank: every rank raises the same error (no rank waits alone)
        assert set(results["errors"]) == {"hessian", "ggn", "ef", "kfac"}
        for msg in results["errors"].values():
            assert "the data is empty on every rank" in msg
