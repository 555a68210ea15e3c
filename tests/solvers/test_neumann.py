"""second.solvers: neumann against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import pytest
import torch

import second
from second import ConvergenceWarning, NegativeCurvatureWarning, relative_error
from second._errors import SecondDeprecationWarning
from spectra import NEUMANN_RELERR, SPECTRA, exact, rhs, sym_matrix


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
    # a positive-definite operator: the scale is too small, which is not negative curvature
    with pytest.warns(ConvergenceWarning, match="diverged.*scale is too small"):
        res = second.neumann_solve(A, rhs(20), scale=2.0, maxiter=500)
    assert res.diverged and not res.converged and not res.negative_curvature


# ------------------------------------------------------------------ Neumann: why it failed
def test_neumann_with_a_given_scale_says_why_it_did_not_converge():
    A = torch.diag(torch.tensor([0.5, 1.0, 2.5], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    # slow divergence (lambda_max / s = 2.5): 1.5 per term, far from the 1e4 guard
    with pytest.warns(ConvergenceWarning, match=r"contraction ~ 1.5000 > 1.*scale is too small"):
        res = second.neumann_solve(A, b, scale=1.0, maxiter=15)
    assert not res.converged and not res.negative_curvature
    # indefinite: negative curvature, which no scale fixes
    Ai = torch.diag(torch.tensor([-0.5, 1.0, 1.5], dtype=torch.float64))
    with pytest.warns(NegativeCurvatureWarning, match="negative curvature detected"):
        res = second.neumann_solve(Ai, b, scale=1.0, maxiter=15)
    assert not res.converged and res.negative_curvature
    # converging, too few terms: an observed contraction, not "nan" (regression)
    with pytest.warns(ConvergenceWarning, match=r"observed contraction ~ 0\.\d+ per term"):
        second.neumann_solve(A, b, scale=2.5, maxiter=5)


NEUMANN_F32_RELRES = 2e-6  # tol 1e-6 plus the float32 rounding floor (20 eps)


@pytest.mark.parametrize("magnitude", [1e-19, 1e-23])
def test_neumann_tolerance_is_relative_for_a_tiny_float32_b(magnitude):
    """Regression: ||r||^2 underflowed in float32, so converged=True with ||r|| = 0."""
    A = sym_matrix(torch.linspace(1, 10, 8).tolist()).float()
    b = rhs(8).float() * magnitude
    res = second.neumann_solve(A, b, tol=1e-6, maxiter=2000)
    true = float((b.double() - A.double() @ res.x.double()).norm() / b.double().norm())
    assert res.converged and true < NEUMANN_F32_RELRES


# ------------------------------------------------------------------ deprecated spellings
def test_solvers_neumann_is_the_deprecated_spelling_of_neumann_solve():
    from second.solvers import neumann

    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    new = second.neumann_solve(A, b, scale=5.0, tol=1e-10)
    match = r"second\.solvers\.neumann is deprecated and stops working in 0\.3: use second\.neumann_solve"
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        old = neumann(A, b, scale=5.0, tol=1e-10)
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert old.converged and torch.equal(old.x, new.x) and old.iterations == new.iterations
    with pytest.raises(TypeError, match="bogus"):
        with pytest.warns(SecondDeprecationWarning):
            neumann(A, b, bogus=1)


def test_seed_neumann_in_the_solver_form_is_deprecated():
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    new = second.neumann_solve(A, b, scale=5.0, tol=1e-10)
    match = r"second\.neumann\(A, b, \.\.\.\) in the solver form is deprecated and stops "
    match += r"working in 0\.3: use second\.neumann_solve\(A, b, \.\.\.\) \(it returns the same"
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        old = second.neumann(A, b, scale=5.0, tol=1e-10)
    assert rec[0].filename == __file__
    assert old.converged and torch.equal(old.x, new.x) and old.iterations == new.iterations
