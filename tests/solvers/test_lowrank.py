"""second.solvers: lowrank against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import pytest
import torch

from second import (
    lowrank,
    relative_error,
)
from second.solvers import lowrank_inverse
from spectra import rhs, sym_matrix


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
