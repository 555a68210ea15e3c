"""A solver's ConvergenceWarning / NegativeCurvatureWarning points at the caller's line, however
the solve was reached: the solver itself, second.solve, an inverse operator, a lowrank solve's
eigsh (the fixed stacklevels landed in _cg.py, _solve.py, _neumann.py or _lowrank.py)."""

from __future__ import annotations

import pytest
import torch

import second
from second import ConvergenceWarning, NegativeCurvatureWarning
from warning_lines import caught_at, spectrum_matrix

N = 20


A = spectrum_matrix(1.0, 1e4, N)  # ill-conditioned: two iterations do not converge
INDEFINITE = spectrum_matrix(-1.0, 5.0, N)
SINGULAR = spectrum_matrix(0.0, 1.0, N)  # eigenvalue 0: b - A x cannot vanish
b = torch.linspace(1.0, 2.0, N, dtype=torch.float64)
B = torch.stack([b, b.flip(0)], dim=1)


UNCONVERGED = {
    "cg": lambda: second.cg(A, b, maxiter=2),
    "cg, block": lambda: second.cg(A, B, maxiter=2),
    "cg through solve": lambda: second.solve(A, b, "cg", maxiter=2),
    "cg through A.inverse": lambda: second.DenseOperator(A).inverse("cg", maxiter=2) @ b,
    "cg through A.inverse, block": lambda: second.DenseOperator(A).inverse("cg", maxiter=2) @ B,
    "minres": lambda: second.minres(A, b, maxiter=2),
    "minres, block": lambda: second.minres(A, B, maxiter=2),
    "minres through solve": lambda: second.solve(A, b, "minres", maxiter=2),
    "minres through solve, block": lambda: second.solve(A, B, "minres", maxiter=2),
    "lsmr": lambda: second.lsmr(A, b, maxiter=2),
    "lsmr through solve": lambda: second.solve(A, b, "lsmr", maxiter=2),
    "lsmr through solve, inconsistent": lambda: second.solve(SINGULAR, b, "lsmr"),
    "neumann_solve": lambda: second.neumann_solve(A, b, maxiter=2),
    "neumann_solve through solve": lambda: second.solve(A, b, "neumann", maxiter=2),
    "lissa": lambda: second.lissa(A, b, depth=3),
    "lissa through solve": lambda: second.solve(A, b, "lissa", depth=3),
    "dense, singular": lambda: second.dense(SINGULAR, b),
    "dense through solve, singular": lambda: second.solve(SINGULAR, b, "dense"),
}


@pytest.mark.parametrize("entry", list(UNCONVERGED))
def test_an_unconverged_solve_warns_at_the_callers_line(entry):
    caught_at(UNCONVERGED[entry], ConvergenceWarning)


def test_the_deprecated_neumann_warns_at_the_callers_line():
    caught = caught_at(lambda: second.solvers.neumann(A, b, maxiter=2), Warning)
    assert {w.category for w in caught} == {
        second._errors.SecondDeprecationWarning,
        ConvergenceWarning,
    }


@pytest.mark.parametrize("through_solve", [False, True])
def test_negative_curvature_warns_at_the_callers_line(through_solve):
    run = (
        (lambda: second.solve(INDEFINITE, b, "cg"))
        if through_solve
        else (lambda: second.cg(INDEFINITE, b))
    )
    caught_at(run, NegativeCurvatureWarning)


EIGSH = {  # eig_tol below any residual: the eigenpairs are never certified
    "eigsh": lambda: second.eigsh(A, k=3, tol=1e-300),
    "lowrank": lambda: second.lowrank(A, b, rank=3, damping=1.0, eig_tol=1e-300),
    "lowrank through solve": lambda: second.solve(
        A, b, "lowrank", rank=3, damping=1.0, eig_tol=1e-300
    ),
    "lowrank_inverse": lambda: second.solvers.lowrank_inverse(A, 3, 1.0, eig_tol=1e-300),
}


@pytest.mark.parametrize("entry", list(EIGSH))
def test_an_uncertified_eigsh_warns_at_the_callers_line(entry):
    caught = caught_at(EIGSH[entry], ConvergenceWarning)
    assert "eigsh" in str(caught[0].message)


def test_report_warns_at_its_callers_line_and_honours_an_explicit_stacklevel():
    res = second.SolveResult(
        x=torch.zeros(2), converged=False, iterations=3, matvecs=3, method="cg", message="m"
    )
    # the first frame outside second and torch: the lambda's line
    caught_at(lambda: second.solvers.report(res, warn=True), ConvergenceWarning)

    # an explicit stacklevel goes to warnings.warn as it is (1: report's own line, in the library)
    report = second.solvers.report
    caught_at(lambda: report(res, True, stacklevel=1), ConvergenceWarning, at=report)
