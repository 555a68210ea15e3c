"""second.solvers: neumann against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import pytest
import torch

import second
from second import (
    ConvergenceWarning,
    NegativeCurvatureWarning,
    lissa,
    relative_error,
)
from spectra import LISSA_RELERR, NEUMANN_RELERR, SPECTRA, exact, rhs, sym_matrix


def test_neumann_auto_scale_spd():
    A = sym_matrix(torch.linspace(0.5, 20, 30).tolist())
    b = rhs(30)
    res = second.neumann_solve(A, b, tol=1e-8, maxiter=5000)
    assert res.converged
    assert res.info["scale"] >= 20 * 0.99  # from a Lanczos estimate of lambda_max
    assert relative_error(res.x, exact(A, b)) < NEUMANN_RELERR


def test_neumann_indefinite_is_reported():
    A = sym_matrix(SPECTRA["indefinite"])
    with pytest.warns(NegativeCurvatureWarning, match="indefinite"):
        res = second.neumann_solve(A, rhs(40))
    assert not res.converged and res.diverged and res.negative_curvature


def test_neumann_too_small_scale_diverges():
    A = sym_matrix(torch.linspace(1, 10, 20).tolist())
    with pytest.warns(NegativeCurvatureWarning, match="diverged"):
        res = second.neumann_solve(A, rhs(20), scale=2.0, maxiter=500)
    assert res.diverged and not res.converged


def test_lissa_stochastic_batches():
    g = torch.Generator().manual_seed(3)
    n, k = 20, 4
    base = [torch.randn(n, 8, generator=g, dtype=torch.float64) for _ in range(k)]
    batches = [B @ B.T / 8 for B in base]
    A = sum(batches) / k
    lam = 0.5
    b = rhs(n)
    x_ref = torch.linalg.solve(A + lam * torch.eye(n, dtype=A.dtype), b)
    res = lissa(batches, b, damping=lam, repeats=100, tol=1e-6, full_operator=A)
    assert res.converged and res.info["predicted_bias"] <= 1e-6
    assert relative_error(res.x, x_ref) < LISSA_RELERR


def test_lissa_warns_about_truncation_bias():
    A = sym_matrix(torch.logspace(-2, 1, 20).tolist())
    with pytest.warns(ConvergenceWarning, match="truncation bias"):
        res = lissa([A], rhs(20), depth=10)
    assert not res.converged and res.info["predicted_bias"] > 0.5
