"""second.solvers: solve against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import second
from conftest import SOLVE_TOL
from second import (
    NegativeCurvatureWarning,
    cg,
    cosine_similarity,
    minres,
    relative_error,
    solve,
)
from second.problems import seed_problem
from second.solvers import choose_method
from spectra import (
    NEUMANN_RELERR,
    SEED_AUTO_F64_RELERR,
    SEED_F32_COSINE,
    SEED_MINRES_F64_RELERR,
    SPECTRA,
    exact,
    rhs,
    sym_matrix,
)


def test_choose_method():
    assert choose_method(torch.eye(3), 3) == "dense"

    class Big(second.LinearOperator):
        psd = True

        def _matvec(self, v):
            return v

    assert choose_method(Big(5000, torch.float64, "cpu"), 5000) == "cg"
    assert (
        choose_method(second.CallableOperator(lambda v: v, 5000, torch.float64), 5000) == "minres"
    )


def test_unknown_method_and_bad_inputs():
    A = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown method"):
        solve(A, torch.ones(3, dtype=torch.float64), method="magic")
    with pytest.raises(ValueError, match="damping"):
        solve(A, torch.ones(3, dtype=torch.float64), method="cg", damping=float("nan"))
    with pytest.raises(ValueError, match="damping >= 0"):
        solve(A, torch.ones(3, dtype=torch.float64), method="lissa", damping=-1.0)
    # a negative damping is a shift: I - 1 I = 0 has no positive curvature, and CG says so
    with pytest.warns(NegativeCurvatureWarning):
        res = solve(A, torch.ones(3, dtype=torch.float64), method="cg", damping=-1.0)
    assert res.negative_curvature and not res.converged
    with pytest.raises(ValueError, match="shape"):
        solve(A, torch.ones(4, dtype=torch.float64), method="cg")
    with pytest.raises(TypeError, match="dtype"):
        solve(A, torch.ones(3, dtype=torch.float32), method="cg")
    with pytest.raises(ValueError, match="NaN"):
        solve(A, torch.tensor([1.0, float("nan"), 0.0], dtype=torch.float64), method="cg")


def test_solve_forwards_only_options_a_method_can_use():
    A = sym_matrix(SPECTRA["spd_well"])
    b = rhs(40)
    with pytest.raises(TypeError, match="'lissa' does not take M, x0"):
        solve(A, b, method="lissa", x0=b, M=A)
    with pytest.raises(TypeError, match="'neumann' does not take M"):
        solve(A, b, method="neumann", M=A)
    # under "auto" a warm start is a hint: the direct solve chosen here ignores it
    res = solve(A, b, x0=b, maxiter=3)
    assert res.info["auto"] == "dense" and res.converged
    # an iterative method uses it
    res = solve(A, b, method="cg", x0=exact(A, b), tol=1e-10)
    assert res.iterations == 0


def test_callable_and_scipy_interop():
    import numpy as np
    from scipy.sparse.linalg import minres as sp_minres

    A = sym_matrix(SPECTRA["indefinite"])
    b = rhs(40)
    res = solve(lambda v: A @ v, b, method="minres", tol=1e-12)
    assert relative_error(res.x, exact(A, b)) < 1e-8
    op = second.DenseOperator(A).to_scipy()
    x_sp, info = sp_minres(op, b.numpy(), rtol=1e-12, maxiter=400)
    assert info == 0
    assert np.allclose(x_sp, exact(A, b).numpy(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed", range(5))
def test_seed_problem_float64_targets(seed):
    p = seed_problem(seed, torch.float64)
    H = second.HessianOperator(p.model, p.loss_fn, p.data)
    g = H.gradient()
    x_ref = torch.linalg.solve(H.to_dense(), g)
    n = g.numel()
    res = minres(H, g, tol=1e-12, maxiter=4 * n, warn=False)
    assert res.matvecs <= 4 * n + 1
    assert relative_error(res.x, x_ref) <= SEED_MINRES_F64_RELERR
    res = solve(H, g)
    assert res.info["auto"] == "dense"
    assert relative_error(res.x, x_ref) <= SEED_AUTO_F64_RELERR
    # CG on the same indefinite system is stopped and says why
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = cg(H, g)
    assert res.negative_curvature and not res.converged


@pytest.mark.parametrize("seed", range(5))
def test_seed_problem_float32_targets(seed):
    p = seed_problem(seed, torch.float32)
    p64 = p.to(torch.float64)
    H64 = second.HessianOperator(p64.model, p64.loss_fn, p64.data)
    x_ref = torch.linalg.solve(H64.to_dense(), H64.gradient())
    H = second.HessianOperator(p.model, p.loss_fn, p.data)
    g = H.gradient()
    assert cosine_similarity(solve(H, g).x, x_ref) >= SEED_F32_COSINE
    res = minres(H, g, tol=1e-6, reorthogonalize=True, recurrence_dtype=torch.float64, warn=False)
    assert cosine_similarity(res.x, x_ref) >= SEED_F32_COSINE


def test_seed_problem_damped_ggn_cg_and_neumann():
    p = seed_problem(0, torch.float64)
    G = second.GGNOperator(p.model, p.loss_fn, p.data)
    g = G.gradient()
    lam = 1e-2
    x_ref = torch.linalg.solve(G.to_dense() + lam * torch.eye(g.numel(), dtype=g.dtype), g)
    res = cg(G, g, damping=lam, tol=1e-12, maxiter=g.numel())
    assert res.matvecs <= g.numel() and relative_error(res.x, x_ref) <= 1e-8
    res = second.neumann_solve(G, g, damping=lam, tol=1e-6, maxiter=20000)
    assert res.converged and relative_error(res.x, x_ref) <= NEUMANN_RELERR


spd_spectra = st.lists(st.floats(0.1, 100.0), min_size=2, max_size=25)
indef_spectra = st.lists(
    st.one_of(st.floats(0.05, 50.0), st.floats(-50.0, -0.05)), min_size=2, max_size=25
)


@settings(max_examples=25, deadline=None)
@given(spd_spectra, st.integers(0, 1000))
def test_property_cg_and_minres_on_spd(ev, seed):
    A = sym_matrix(ev, seed=seed)
    b = rhs(len(ev), seed=seed + 1)
    x_ref = exact(A, b)
    for method in (cg, minres):
        res = method(A, b, tol=1e-12, maxiter=20 * len(ev), warn=False)
        assert res.converged
        assert relative_error(res.x, x_ref) < 1e-8


@settings(max_examples=25, deadline=None)
@given(indef_spectra, st.integers(0, 1000))
def test_property_indefinite(ev, seed):
    A = sym_matrix(ev, seed=seed)
    b = rhs(len(ev), seed=seed + 1)
    x_ref = exact(A, b)
    res = minres(A, b, tol=1e-12, maxiter=20 * len(ev), warn=False)
    assert res.converged and relative_error(res.x, x_ref) < 1e-7
    res = cg(A, b, tol=1e-12, maxiter=20 * len(ev), warn=False)
    # CG either converges (the Krylov space happened to avoid negative curvature), and is then
    # right, or says why not; it never reports convergence with a wrong answer
    if res.converged:
        assert relative_error(res.x, x_ref) < 1e-6
    else:
        assert res.negative_curvature or "did not converge" in res.message or "true" in res.message


@pytest.mark.parametrize("method", [cg, minres])
def test_nan_product_is_an_error_not_a_silent_loop(method):
    def bad(v):
        return v * float("nan")

    op = second.CallableOperator(bad, 4, torch.float64)
    op.check_finite = False  # even with the operator's own check off, the solver refuses
    with pytest.raises(second.NonFiniteError):
        method(op, torch.ones(4, dtype=torch.float64))


def test_auto_takes_lsmr_for_a_scipy_operator_that_declares_itself_nonsymmetric():
    # a raw SciPy operator whose `symmetric` attribute is False: "auto" must not pick a
    # symmetric method (which refuses it) above the dense threshold
    import numpy as np
    import scipy.sparse.linalg as sla

    from second.solvers._solve import DENSE_THRESHOLD

    n = DENSE_THRESHOLD + 10
    d = np.linspace(1.0, 2.0, n)

    def mv(v):
        v = np.asarray(v).reshape(-1)
        out = d * v
        out[1:] += 0.3 * v[:-1]  # lower bidiagonal: not symmetric
        return out

    def rmv(v):
        v = np.asarray(v).reshape(-1)
        out = d * v
        out[:-1] += 0.3 * v[1:]
        return out

    A = sla.LinearOperator((n, n), matvec=mv, rmatvec=rmv, dtype=np.float64)
    A.symmetric = False
    assert choose_method(A, n) == "lsmr"
    b = torch.ones(n, dtype=torch.float64)
    res = second.solve(second.aslinearoperator(A, symmetric=False), b, tol=1e-10)
    assert res.converged
    x = res.x.numpy()
    assert np.linalg.norm(mv(x) - b.numpy()) <= 1e-8 * np.linalg.norm(b.numpy())


# --------------------------------------------------- tiny float32 b, NaN operators (regressions)
TINY_F32_RELRES = 2e-6  # tol 1e-6 plus the float32 rounding floor 20 eps
SMALL_METHODS = ["cg", "minres", "neumann", "lsmr", "dense"]


@pytest.mark.parametrize("magnitude", [1e-19, 1e-23])
@pytest.mark.parametrize("method", SMALL_METHODS)
def test_tolerance_is_relative_for_a_tiny_float32_b(method, magnitude):
    """Regression: ||b|| underflowed in float32, so x = 0 with converged=True ("b = 0")."""
    A = sym_matrix(torch.linspace(1, 10, 8).tolist()).float()
    b = rhs(8).float() * magnitude
    res = solve(A, b, method=method, tol=1e-6)
    x_ref = exact(A, b)
    true = float((b.double() - A.double() @ res.x.double()).norm() / b.double().norm())
    assert res.converged and "b = 0" not in res.message, res.message
    assert true < TINY_F32_RELRES
    assert relative_error(res.x, x_ref) < SOLVE_TOL[torch.float32]


def test_cg_block_with_a_tiny_column_solves_every_column():
    A = sym_matrix(torch.linspace(1, 10, 8).tolist()).float()
    B = torch.stack([rhs(8).float() * 1e-23, rhs(8, seed=2).float()], dim=1)
    res = cg(A, B, tol=1e-6)
    assert res.info["converged_columns"] == [True, True]
    for j in range(2):
        assert relative_error(res.x[:, j], exact(A, B[:, j])) < SOLVE_TOL[torch.float32]


@pytest.mark.parametrize("method", ["cg", "minres", "neumann", "lowrank", "dense"])
def test_an_operator_with_nan_entries_is_a_non_finite_error(method):
    """Regression: NaN != NaN made a symmetric matrix "declare symmetric=False" (dense: an
    internal LAPACK assertion)."""
    A = sym_matrix(torch.linspace(1, 10, 6).tolist())
    A[2, 3] = A[3, 2] = float("nan")
    with pytest.raises(second.NonFiniteError, match="NaN"):
        solve(A, rhs(6), method=method)


@pytest.mark.parametrize("method", ["cg", "minres", "neumann", "lsmr"])
def test_a_float64_b_beyond_the_inner_products_range_is_refused_not_zeroed(method):
    """Regression: ||b||^2 underflowed in float64 too (b ~ 1e-170): x = 0, converged=True."""
    A = sym_matrix(torch.linspace(1, 10, 8).tolist())
    b = rhs(8) * 1e-170
    with pytest.raises(ValueError, match="outside"):
        solve(A, b, method=method)
    res = solve(A, b, method="dense")  # no inner products of b with itself: exact
    assert res.converged
    assert relative_error(res.x * 1e170, exact(A, b * 1e170)) < SOLVE_TOL[torch.float64]
