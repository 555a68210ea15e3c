"""Spectra, traces and diagonals data-sharded over 2 gloo processes equal one process.

The rule is the operators' (see second.operators.curvature): each rank passes its own shard of
the data, products and exact diagonals are summed over ranks, and the random probes are the
same on every rank (the default generators are seeded alike), so every rank computes the
whole dataset's answer. One spawn runs every check; the parent compares with one process.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from distributed_cases import spawn_ranks
from second import GGNOperator, HessianOperator, diagonal, eigsh, trace
from second.spectral import ggn_diagonal

pytestmark = pytest.mark.distributed

WORLD_SIZE = 2
N_DATA = 13
SHARDS = [(0, 5), (5, 13)]  # unequal shards: a mean is weighted by example counts
WEIGHTED_LOSS = nn.CrossEntropyLoss(
    weight=torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64), ignore_index=1
)
SAME_TOL = dict(rtol=1e-9, atol=1e-11)  # float64; only the summation order differs


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(N_DATA, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (N_DATA,))
    return model, nn.CrossEntropyLoss(), X, y


def _results(model, loss_fn, data) -> dict:
    H = HessianOperator(model, loss_fn, data)
    G = GGNOperator(model, loss_fn, data)
    out = {
        "eigsh LA": eigsh(H, k=3, which="LA", tol=1e-10, return_eigenvectors=False),
        "eigsh BE eigenvalue criterion": eigsh(
            H, k=2, which="BE", tol=1e-8, criterion="eigenvalue", return_eigenvectors=False
        ),
        "ggn_diagonal": ggn_diagonal(model, loss_fn, data),
        # a weighted mean: the ranks' total weight is summed (rank 0's first batch, all of
        # class 1, is fully ignored and skipped)
        "ggn_diagonal weighted": ggn_diagonal(model, WEIGHTED_LOSS, data),
        "diagonal exact": diagonal(G, method="exact"),
        "diagonal control": diagonal(H, 20, control="ggn"),
        "diagonal xdiag": diagonal(H, 20, method="xdiag"),
    }
    for method in ("hutchinson", "hutch++", "xtrace"):
        est = trace(H, 12, method=method, return_result=True)
        out[f"trace {method}"] = torch.stack([est.value, est.std_error])
    return out


def _worker(rank: int, world: int, outdir: str) -> None:
    model, loss_fn, X, y = _problem()
    lo, hi = SHARDS[rank]
    shard = [(X[lo : lo + 2], y[lo : lo + 2]), (X[lo + 2 : hi], y[lo + 2 : hi])]
    torch.save(_results(model, loss_fn, shard), os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist_spectral"))
    spawn_ranks(_worker, WORLD_SIZE, outdir)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


def test_sharded_estimates_equal_one_process(rank_results):
    model, loss_fn, X, y = _problem()
    expected = _results(model, loss_fn, (X, y))
    # the check is not vacuous: a shard alone gives another answer
    alone = ggn_diagonal(model, loss_fn, (X[: SHARDS[0][1]], y[: SHARDS[0][1]]))
    assert not torch.allclose(alone, expected["ggn_diagonal"], **SAME_TOL)
    for rank, results in enumerate(rank_results):
        assert results.keys() == expected.keys()
        for name, want in expected.items():
            torch.testing.assert_close(
                results[name], want, **SAME_TOL, msg=lambda m, n=name, r=rank: f"{n}, rank {r}: {m}"
            )


# --- inputs that differ per rank: every rank must raise the same clear error -------------

PER_RANK_CASES = ("trace", "diagonal", "eigsh generator", "eigsh v0", "cg b", "lissa")


def _expect_error(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _per_rank_worker(rank: int, world: int, outdir: str) -> None:
    from second import cg, lissa

    model, loss_fn, X, y = _problem()
    lo, hi = SHARDS[rank]
    shard = [(X[lo : lo + 2], y[lo : lo + 2]), (X[lo + 2 : hi], y[lo + 2 : hi])]
    G = GGNOperator(model, loss_fn, shard)
    n = G.shape[0]
    mine = torch.Generator().manual_seed(rank)  # a per-rank seed: refused
    same = torch.Generator().manual_seed(7)  # the same seed on every rank: accepted
    b = torch.ones(n, dtype=torch.float64)
    out = {
        "trace": _expect_error(lambda: trace(G, 8, method="hutchinson", generator=mine)),
        "diagonal": _expect_error(lambda: diagonal(G, 8, generator=mine)),
        "eigsh generator": _expect_error(
            lambda: eigsh(G, k=1, generator=mine, return_eigenvectors=False)
        ),
        "eigsh v0": _expect_error(
            lambda: eigsh(G, k=1, v0=torch.randn(n, generator=mine, dtype=torch.float64))
        ),
        "cg b": _expect_error(lambda: cg(G, b * (rank + 1), damping=0.1)),
        "lissa": _expect_error(lambda: lissa(G, b, damping=0.1, warn=False)),
        "same generator trace": trace(G, 8, method="hutchinson", generator=same),
        "same b cg": cg(G, b, damping=0.1, tol=1e-12).x,
    }
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def per_rank_results(tmp_path_factory):
    outdir = str(tmp_path_factory.mktemp("dist_per_rank"))
    spawn_ranks(_per_rank_worker, WORLD_SIZE, outdir)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("case", PER_RANK_CASES)
def test_inputs_that_differ_per_rank_are_refused_on_every_rank(per_rank_results, case):
    """Regression: a per-rank generator or b gave each rank a wrong answer of its own;
    lissa solved each rank's own shard and reported converged."""
    for res in per_rank_results:
        msg = res[case]
        assert "differs between ranks" in msg or "cg or minres" in msg, msg


def test_inputs_alike_on_every_rank_give_the_single_process_answer(per_rank_results):
    from second import cg

    model, loss_fn, X, y = _problem()
    G = GGNOperator(model, loss_fn, (X, y))
    b = torch.ones(G.shape[0], dtype=torch.float64)
    expected = {
        "same generator trace": trace(
            G, 8, method="hutchinson", generator=torch.Generator().manual_seed(7)
        ),
        "same b cg": cg(G, b, damping=0.1, tol=1e-12).x,
    }
    for res in per_rank_results:
        for key, want in expected.items():
            torch.testing.assert_close(res[key], want, **SAME_TOL)
