"""second.solvers: minres against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import pytest
import torch

from second import (
    ConvergenceWarning,
    cosine_similarity,
    minres,
    relative_error,
)
from spectra import SPECTRA, exact, rhs, sym_matrix

MINRES_TOL = {"spd_well": 1e-12, "spd_ill": 1e-7, "indefinite": 1e-12}


@pytest.mark.parametrize("name", list(SPECTRA))
def test_minres_float64(name):
    A = sym_matrix(SPECTRA[name])
    b = rhs(40)
    tol = MINRES_TOL[name]
    res = minres(A, b, tol=tol, maxiter=400)
    assert res.converged, res.message
    cond = max(abs(e) for e in SPECTRA[name]) / min(abs(e) for e in SPECTRA[name])
    assert relative_error(res.x, exact(A, b)) <= max(1e-9, 10 * cond * tol)
    if name == "indefinite":
        assert res.negative_curvature


@pytest.mark.parametrize(
    "options", [dict(recurrence_dtype=torch.float64), dict(reorthogonalize=True)]
)
def test_minres_float32_options(options):
    A = sym_matrix(SPECTRA["indefinite"], torch.float32)
    b = rhs(40, torch.float32)
    res = minres(A, b, tol=1e-6, maxiter=400, warn=False, **options)
    assert cosine_similarity(res.x, exact(A, b)) > 0.9999


def test_minres_true_residual_checked():
    A = sym_matrix(SPECTRA["indefinite"])
    res = minres(A, rhs(40), tol=1e-10)
    assert res.info["true_residual"] <= 1e-10 * float(rhs(40).norm()) * 1.01 + 1e-14


def test_minres_not_converged_warns():
    with pytest.warns(ConvergenceWarning):
        res = minres(sym_matrix(SPECTRA["spd_ill"]), rhs(40), tol=1e-14, maxiter=5)
    assert not res.converged


def test_minres_singular_consistent_gives_min_norm():
    ev = [0.0] * 5 + torch.linspace(-2, 3, 20).tolist()
    A = sym_matrix(ev)
    b = A @ rhs(25)  # consistent: b in range(A)
    res = minres(A, b, tol=1e-12, maxiter=200)
    x_min = torch.linalg.pinv(A) @ b
    assert relative_error(res.x, x_min) < 1e-7


MINRES_LSQ_RELERR = 1e-8  # the least-squares residual, vs a dense float64 pinv


def test_minres_singular_inconsistent_returns_the_least_squares_iterate():
    """Regression: x blew up to 1e15 (gamma ~ 0) and the message quoted the estimate 0.42 for
    a true residual of 1.6e14."""
    g = torch.Generator().manual_seed(3)
    U = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=torch.float64))[0]
    S = (U * torch.arange(1.0, 6.0, dtype=torch.float64)) @ U.T
    b = S @ torch.randn(8, generator=g, dtype=torch.float64)
    b = b + 0.5 * (torch.eye(8, dtype=torch.float64) - U @ U.T) @ torch.randn(
        8, generator=g, dtype=torch.float64
    )
    lsq = float((b - S @ torch.linalg.pinv(S) @ b).norm())
    with pytest.warns(ConvergenceWarning, match="inconsistent"):
        res = minres(S, b, tol=1e-8)
    true = float((b - S @ res.x).norm())
    assert not res.converged and res.info["inconsistent"]
    assert abs(true - lsq) <= MINRES_LSQ_RELERR * lsq
    assert res.residual_norm == pytest.approx(true, rel=1e-10)
    assert f"{true:.3e}" in res.message


def test_minres_float32_below_its_floor_stagnates_and_reports_the_true_residual():
    """Regression: "||r|| ~ 3.5e-13 > 5.5e-10" (the estimate) for a true 1.6e-4, all 5 n
    iterations, stagnated=False."""
    A = sym_matrix(torch.logspace(0, 3, 30).tolist()).float()
    b = rhs(30).float()
    with pytest.warns(ConvergenceWarning, match="stagnated"):
        res = minres(A, b, tol=1e-10)
    assert res.info["stagnated"] and not res.converged
    assert res.iterations < 150
    rel = res.info["true_residual"] / float(b.double().norm())
    assert f"{rel:.2e}" in res.message


def test_minres_block_callback_and_history_match_cg():
    """Regression: the callback got each column's (n,) iterates and residual_norms had one
    entry, not the residual at x0 first."""
    A = sym_matrix(SPECTRA["spd_well"])
    B = torch.stack([rhs(40), rhs(40, seed=2)], dim=1)
    shapes = []
    res = minres(A, B, tol=1e-10, callback=lambda X: shapes.append(tuple(X.shape)))
    assert res.converged and set(shapes) == {(40, 2)}
    assert res.residual_norms[0] == pytest.approx(float(B.norm(dim=0).max()))
    assert len(res.residual_norms) > 2


def test_minres_names_a_nonsymmetric_preconditioner():
    A = sym_matrix(torch.linspace(1, 10, 8).tolist())
    M = torch.linalg.inv(A) + 0.3 * torch.triu(torch.ones(8, 8, dtype=torch.float64), 1)
    with pytest.warns(ConvergenceWarning, match="M is not symmetric"):
        minres(A, rhs(8), M=M)
