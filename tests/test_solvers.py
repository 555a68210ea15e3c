"""Solvers against dense float64 solves on matrices with chosen spectra and on the seed problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import second
from conftest import DTYPES, SOLVE_TOL
from second import (
    ConvergenceWarning,
    NegativeCurvatureWarning,
    cg,
    cosine_similarity,
    dense,
    lissa,
    lowrank,
    minres,
    relative_error,
    solve,
)
from second.problems import seed_problem
from second.solvers import choose_method, lowrank_inverse

# Tolerances specific to this file (see conftest for the shared tables).
SEED_MINRES_F64_RELERR = 1e-8  # issue target: <= 1e-8 within 4 n products
SEED_AUTO_F64_RELERR = 1e-10  # issue target
SEED_F32_COSINE = 0.999  # issue target for float32 products
NEUMANN_RELERR = 1e-3  # issue target for automatic scale on a damped PSD matrix
LISSA_RELERR = (
    6e-2  # stochastic: 4 very different rank-8 batches, 100 repeats; error ~ 1/sqrt(repeats)
)


def sym_matrix(eigenvalues, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def rhs(n, dtype=torch.float64, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        dtype
    )


SPECTRA = {
    "spd_well": torch.linspace(1.0, 10.0, 40).tolist(),
    "spd_ill": torch.logspace(-4, 2, 40).tolist(),
    "indefinite": torch.cat([-torch.logspace(-2, 1, 15), torch.logspace(-2, 1, 25)]).tolist(),
}


def exact(A, b):
    return torch.linalg.solve(A.double(), b.double())


# ----------------------------------------------------------------------------- CG
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


# ----------------------------------------------------------------------------- MINRES
# MINRES' true residual stalls near eps * cond(A) * ||A|| ||x|| (its x-update recurrence
# amplifies rounding), so the cond-1e6 matrix is asked for 1e-7, not 1e-12.
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


# ----------------------------------------------------------------------------- Neumann, LiSSA
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


# ----------------------------------------------------------------------------- low rank, dense, auto
def test_lowrank_exact_for_low_rank_matrix():
    ev = [9.0, 4.0, 1.0] + [0.0] * 17
    A = sym_matrix(ev)
    b = rhs(20)
    lam = 0.1
    res = lowrank(A, b, rank=3, damping=lam)
    x_ref = torch.linalg.solve(A + lam * torch.eye(20, dtype=A.dtype), b)
    assert relative_error(res.x, x_ref) < 1e-8
    # dropping the complement term (plain truncation) is much worse
    U = res.info["eigenvectors"]
    vals = res.info["eigenvalues"]
    truncated = U @ ((U.T @ b) / (vals + lam))
    assert relative_error(truncated, x_ref) > 0.5


def test_dense_singular_consistent_and_inconsistent():
    A = sym_matrix([0.0, 0.0, 1.0, 2.0, -3.0])
    b = A @ rhs(5)
    res = dense(A, b)
    assert res.converged and res.info["rank"] == 3
    assert relative_error(res.x, torch.linalg.pinv(A) @ b) < 1e-10
    evals, evecs = torch.linalg.eigh(A)
    e = evecs[:, evals.abs().argmin()]  # a null vector
    with pytest.warns(ConvergenceWarning, match="inconsistent"):
        res = dense(A, b + e)
    assert not res.converged


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


# ----------------------------------------------------------------------------- the seed problem
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


# ----------------------------------------------------------------------------- properties
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


def test_lowrank_mean_complement_beats_zero_on_a_heavy_tail():
    # top eigenvalues then a long flat tail: the tail's mean is what "zero" gets wrong
    ev = [50.0, 20.0, 10.0] + [1.0] * 57
    A = sym_matrix(ev, seed=4)
    b = rhs(60)
    lam = 0.1
    x_ref = torch.linalg.solve(A + lam * torch.eye(60, dtype=A.dtype), b)
    zero = lowrank(A, b, rank=3, damping=lam)
    mean = lowrank(A, b, rank=3, damping=lam, complement="mean", complement_probes=20)
    assert abs(mean.info["complement_eigenvalue"] - 1.0) < 0.2
    assert relative_error(mean.x, x_ref) < 0.2 * relative_error(zero.x, x_ref)
    fixed = lowrank(A, b, rank=3, damping=lam, complement=1.0)
    assert relative_error(fixed.x, x_ref) < 1e-8  # exact when c is the true tail eigenvalue
    with pytest.raises(ValueError, match="complement"):
        lowrank(A, b, rank=3, damping=lam, complement="nope")


def test_lowrank_harmonic_complement_on_a_tail_spread_over_decades():
    # the tail spans four decades: its mean is set by its largest eigenvalues, while the
    # inverse is set by the small ones; the damped harmonic mean weighs them as the inverse does
    ev = [100.0, 50.0, 20.0] + torch.logspace(0, -4, 97).tolist()
    A = sym_matrix(ev, seed=4)
    b = rhs(100)
    lam = 1e-3
    x_ref = torch.linalg.solve(A + lam * torch.eye(100, dtype=A.dtype), b)
    tail = torch.tensor(ev[3:], dtype=torch.float64)
    c_true = float(1.0 / (1.0 / (tail + lam)).mean() - lam)
    errs = {}
    for complement in ("zero", "mean", "harmonic"):
        res = lowrank(A, b, rank=3, damping=lam, complement=complement, complement_probes=20)
        errs[complement] = relative_error(res.x, x_ref)
        if complement == "harmonic":
            assert abs(res.info["complement_eigenvalue"] - c_true) < 0.1 * c_true
    assert errs["harmonic"] < 0.9 * errs["mean"] < errs["zero"]
    with pytest.raises(ValueError, match="damping"):
        lowrank(A, b, rank=3, damping=0.0, complement="harmonic")


def test_lowrank_harmonic_complement_exact_for_a_flat_tail():
    # one Lanczos step on the projected operator finds the tail exactly (given exact U)
    ev = [50.0, 20.0, 10.0] + [1.0] * 57
    A = sym_matrix(ev, seed=4)
    b = rhs(60)
    lam = 0.1
    x_ref = torch.linalg.solve(A + lam * torch.eye(60, dtype=A.dtype), b)
    res = lowrank(
        A, b, rank=3, damping=lam, complement="harmonic", complement_probes=3, eig_tol=1e-10
    )
    assert abs(res.info["complement_eigenvalue"] - 1.0) < 1e-8
    assert relative_error(res.x, x_ref) < 1e-8


def test_lowrank_weighted_complement_for_right_hand_sides_with_covariance_a():
    # b = A^(1/2) z has covariance A (as gradients have, for a Fisher): their energy in the
    # tail is weighted by the eigenvalues, and so is the "weighted" complement. Measured on
    # the sum of the quadratic forms b^T (A + lam I)^{-1} b (influence scores are such forms)
    ev = [100.0, 50.0, 20.0] + torch.logspace(0, -4, 97).tolist()
    A = sym_matrix(ev, seed=4)
    lam = 1e-3
    w, V = torch.linalg.eigh(A)
    Z = torch.randn(100, 40, generator=torch.Generator().manual_seed(3), dtype=A.dtype)
    B = V @ (w.clamp(min=0).sqrt()[:, None] * (V.T @ Z))
    X_ref = torch.linalg.solve(A + lam * torch.eye(100, dtype=A.dtype), B)
    tail = torch.tensor(ev[3:], dtype=torch.float64)
    c_true = float(tail.sum() / (tail / (tail + lam)).sum() - lam)
    errs = {}
    for complement in ("zero", "mean", "harmonic", "weighted"):
        inv = lowrank_inverse(A, 3, lam, complement=complement, complement_probes=20)
        quad, quad_ref = float((B * inv(B)).sum()), float((B * X_ref).sum())
        errs[complement] = abs(quad - quad_ref) / quad_ref
        if complement == "weighted":
            assert abs(inv.complement_eigenvalue - c_true) < 0.1 * c_true
    assert errs["weighted"] < 0.5 * min(errs["mean"], errs["harmonic"], errs["zero"])
    flat = sym_matrix([50.0, 20.0, 10.0] + [1.0] * 57, seed=4)
    inv = lowrank_inverse(flat, 3, 0.1, complement="weighted", complement_probes=3, eig_tol=1e-10)
    assert abs(inv.complement_eigenvalue - 1.0) < 1e-8  # exact for a flat tail
