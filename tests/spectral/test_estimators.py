"""Spectral tools against dense eigendecompositions."""

from __future__ import annotations

import pytest
import torch

import second
from second import diagonal, eigsh, spectral_density, trace
from second.problems import seed_problem
from spectra import sym_matrix

EIG_TOL = 1e-8  # eigenvalues from Lanczos with full re-orthogonalization, float64
HUTCH_REL = 0.15  # Hutchinson with 400 probes on a 60x60 matrix: a few standard deviations
HUTCHPP_REL = 0.02  # Hutch++ on a fast-decaying spectrum
DIAG_REL = 0.25  # per-vector relative error of a 400-probe diagonal estimate


@pytest.fixture
def A():
    ev = torch.cat([torch.logspace(-3, 2, 50), -torch.linspace(0.5, 3, 10)])
    return sym_matrix(ev.tolist(), seed=5)


@pytest.mark.parametrize("which", ["LA", "SA", "LM", "BE"])
def test_eigsh_matches_dense(A, which):
    k = 6
    vals, vecs = eigsh(A, k=k, which=which, tol=1e-10)
    ref = torch.linalg.eigvalsh(A)
    if which == "LA":
        want = ref[-k:]
    elif which == "SA":
        want = ref[:k]
    elif which == "LM":
        want = ref[ref.abs().argsort()[-k:]].sort().values
    else:
        want = torch.cat([ref[: k // 2], ref[-(k - k // 2) :]])
    assert torch.allclose(vals, want, atol=EIG_TOL * float(ref.abs().max()))
    # eigenvectors: orthonormal columns with small residuals
    assert torch.allclose(vecs.T @ vecs, torch.eye(k, dtype=A.dtype), atol=1e-8)
    assert float((A @ vecs - vecs * vals).norm()) < 1e-6


def test_eigsh_on_curvature_operator():
    p = seed_problem(0, torch.float64)
    H = second.HessianOperator(p.model, p.loss_fn, p.data)
    vals = eigsh(H, k=3, which="BE", return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(H.to_dense())
    assert torch.allclose(vals, torch.stack([ref[0], ref[-2], ref[-1]]), atol=1e-9)


def test_eigsh_bad_arguments(A):
    with pytest.raises(ValueError):
        eigsh(A, k=0)
    with pytest.raises(ValueError):
        eigsh(A, k=2, which="XX")


def test_trace_estimators(A):
    exact = float(torch.trace(A))
    assert float(trace(A, method="exact")) == pytest.approx(exact, rel=1e-12)
    fro = float(A.norm())
    est = float(trace(A, 400, method="hutchinson"))
    assert abs(est - exact) < HUTCH_REL * fro
    # a PSD matrix with decaying spectrum: Hutch++ is far more accurate at equal budget
    B = sym_matrix((10.0 ** -torch.arange(0, 60) * 1.0).tolist()[:60], seed=2)
    B = B @ B.T
    tb = float(torch.trace(B))
    assert abs(float(trace(B, 30, method="hutch++")) - tb) < HUTCHPP_REL * tb
    with pytest.raises(ValueError):
        trace(A, method="nope")


def test_diagonal_estimators(A):
    d = torch.diagonal(A)
    assert torch.allclose(diagonal(A, method="exact"), d)
    est = diagonal(A, 400)
    assert float((est - d).norm() / A.norm()) < DIAG_REL


def test_lanczos_estimates_refuse_a_nonsymmetric_operator():
    """extreme_eigenvalues and spectral_density returned numbers for a nonsymmetric matrix."""
    import numpy as np
    import scipy.sparse.linalg as sla

    from second.spectral import extreme_eigenvalues

    M = np.array([[1.0, 5.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    calls = {
        "extreme_eigenvalues": lambda A: extreme_eigenvalues(A),
        "spectral_density": lambda A: spectral_density(A, num_probes=2, lanczos_steps=3),
    }
    for name, call in calls.items():
        with pytest.raises(
            ValueError, match=f"{name} needs a symmetric operator; this one declares"
        ):
            call(torch.tensor(M))  # a dense tensor: its symmetry is known
        with pytest.raises(ValueError, match=f"{name} needs a symmetric operator, and this one is"):
            call(sla.aslinearoperator(M))  # declared symmetric when wrapped: found by the probe


def test_lanczos_estimates_of_a_float32_hessian_are_not_false_alarms():
    from second.spectral import extreme_eigenvalues

    p = seed_problem(0, torch.float32)
    H = second.HessianOperator(p.model, p.loss_fn, p.data)
    ref = torch.linalg.eigvalsh(H.to_dense().double())
    lo, hi = extreme_eigenvalues(H, steps=H.shape[0])
    assert hi == pytest.approx(float(ref[-1]), rel=1e-3)
    assert lo == pytest.approx(float(ref[0]), abs=1e-3 * float(ref.abs().max()))
    grid, density, nodes, weights = spectral_density(H, num_probes=2, lanczos_steps=20)
    assert bool(torch.isfinite(density).all())
