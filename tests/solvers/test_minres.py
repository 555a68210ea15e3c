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
