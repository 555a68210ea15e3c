"""second.solvers: cg against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import pytest
import torch

from conftest import DTYPES, SOLVE_TOL
from second import (
    ConvergenceWarning,
    NegativeCurvatureWarning,
    cg,
    relative_error,
    solve,
)
from spectra import SPECTRA, exact, rhs, sym_matrix

# CG's true residual drifts from its recursive one by ~eps ||A|| ||x||: for cond 1e6 a
# relative residual of 1e-12 is not attainable in float64, so that case asks for 1e-9.
CG_TOL = {
    ("spd_well", torch.float64): 1e-12,
    ("spd_ill", torch.float64): 1e-9,
    ("spd_well", torch.float32): 1e-5,
    ("spd_ill", torch.float32): 1e-5,
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["spd_well", "spd_ill"])
def test_cg_spd(dtype, name):
    A = sym_matrix(SPECTRA[name], dtype)
    b = rhs(40, dtype)
    tol = CG_TOL[name, dtype]
    res = cg(A, b, tol=tol, maxiter=2000, warn=False)
    cond = max(SPECTRA[name]) / min(SPECTRA[name])
    assert res.converged or (dtype == torch.float32 and name == "spd_ill"), res.message
    assert relative_error(res.x, exact(A, b)) <= SOLVE_TOL[dtype] * max(
        1.0, cond * tol / SOLVE_TOL[dtype]
    )
    assert len(res.residual_norms) == res.iterations + 1
    assert not res.negative_curvature


def test_cg_reports_negative_curvature():
    A = sym_matrix(SPECTRA["indefinite"])
    b = rhs(40)
    with pytest.warns(NegativeCurvatureWarning, match="non-positive curvature"):
        res = cg(A, b, tol=1e-10)
    assert not res.converged
    assert res.negative_curvature and res.negative_curvature_iteration is not None
    # the returned iterate is the last safe one, never a step along the bad direction
    assert torch.isfinite(res.x).all()


def test_cg_damping_and_preconditioner():
    A = sym_matrix(SPECTRA["spd_ill"])
    b = rhs(40)
    lam = 0.5
    x_ref = torch.linalg.solve(A + lam * torch.eye(40, dtype=A.dtype), b)
    res = cg(A, b, damping=lam, tol=1e-12)
    assert relative_error(res.x, x_ref) < 1e-9
    # the exact inverse as preconditioner converges in one iteration
    Minv = torch.linalg.inv(A + lam * torch.eye(40, dtype=A.dtype))
    res = cg(A, b, damping=lam, tol=1e-10, M=Minv)
    assert res.iterations == 1 and res.converged


def test_cg_not_converged_warns():
    A = sym_matrix(SPECTRA["spd_ill"])
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = cg(A, rhs(40), tol=1e-12, maxiter=3)
    assert not res.converged and res.iterations == 3


def test_parameter_shaped_rhs_round_trips():
    A = sym_matrix(SPECTRA["spd_well"][:6])
    b = (torch.ones(2, 2, dtype=torch.float64), torch.arange(2.0, dtype=torch.float64))
    res = solve(A, b, method="cg", tol=1e-12)
    assert isinstance(res.x, tuple) and res.x[0].shape == (2, 2) and res.x[1].shape == (2,)
    flat = torch.cat([t.reshape(-1) for t in res.x])
    assert relative_error(flat, exact(A, torch.cat([b[0].reshape(-1), b[1]]))) < 1e-10


def test_cg_no_false_negative_curvature_from_an_underflowing_p_A_p():
    """Regression: with b ~ 1e-19 in float32, p^T A p underflowed to 0 on an SPD matrix."""
    A = sym_matrix(torch.linspace(1, 10, 8).tolist()).float()
    b = rhs(8).float() * 1e-19
    res = cg(A, b, tol=1e-6)
    assert res.converged and not res.negative_curvature
    assert relative_error(res.x, exact(A, b)) < SOLVE_TOL[torch.float32]


def _inconsistent_psd(n=8, rank=5, seed=3):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    S = (U * torch.arange(1.0, rank + 1, dtype=torch.float64)) @ U.T
    b = S @ torch.randn(n, generator=g, dtype=torch.float64)
    b = b + 0.5 * (torch.eye(n, dtype=torch.float64) - U @ U.T) @ torch.randn(
        n, generator=g, dtype=torch.float64
    )
    return S, b


def test_cg_on_a_singular_inconsistent_system_says_so():
    """Regression: a PSD matrix with b off its range was called "not positive definite"."""
    S, b = _inconsistent_psd()
    with pytest.warns(NegativeCurvatureWarning, match="inconsistent.*lsmr"):
        res = cg(S, b, tol=1e-8)
    assert not res.converged and "not positive definite" not in res.message
    true = float((b - S @ res.x).norm())
    assert res.residual_norm == pytest.approx(true, rel=1e-10)  # the x returned
    assert true < float(b.norm())  # the best iterate, not the diverging last one


def test_cg_names_a_nonsymmetric_preconditioner():
    A = sym_matrix(torch.linspace(1, 10, 8).tolist())
    M = torch.linalg.inv(A) + 0.3 * torch.triu(torch.ones(8, 8, dtype=torch.float64), 1)
    with pytest.warns(ConvergenceWarning, match="M is not symmetric"):
        cg(A, rhs(8), M=M)
