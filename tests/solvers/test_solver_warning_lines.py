"""A solver's ConvergenceWarning / NegativeCurvatureWarning points at the caller's line, however
the solve was reached: the solver itself, second.solve, an inverse operator, a lowrank solve's
eigsh (the fixed stacklevels landed in _cg.py, _solve.py, _neumann.py or _lowrank.py)."""

from __future__ import annotations

import warnings

import pytest
import torch

import second
from second import ConvergenceWarning, NegativeCurvatureWarning

N = 20


def _matrix(low: float, high: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.linspace(low, high, N, dtype=torch.float64)) @ Q.T


A = _matrix(1.0, 1e4)  # ill-conditioned: two iterations do not converge
INDEFINITE = _matrix(-1.0, 5.0)
SINGULAR = _matrix(0.0, 1.0)  # eigenvalue 0: b - A x cannot vanish
b = torch.linspace(1.0, 2.0, N, dtype=torch.float64)
B = torch.stack([b, b.flip(0)], dim=1)


def _lines(fn):
    """The lines of ``fn``'s body."""
    return {line for _, _, line in fn.__code__.co_lines() if line is not None}


def _recorded(fn, category):
    """The warnings of ``category`` that ``fn()`` raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    caught = [w for w in caught if issubclass(w.category, category)]
    assert caught, f"no {category.__name__}"
    return caught


def _caught(fn, category):
    """The warnings of ``category`` that ``fn()`` raised; each must point inside ``fn``'s body.

    The line matters, not only the file: a stacklevel one too large lands at ``fn()`` in
    ``_recorded``, in this file too.
    """
    caught = _recorded(fn, category)
    where = [(w.filename, w.lineno) for w in caught]
    assert all(w.filename == __file__ and w.lineno in _lines(fn) for w in caught), where
    return caught


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
    _caught(UNCONVERGED[entry], ConvergenceWarning)


def test_the_deprecated_neumann_warns_at_the_callers_line():
    caught = _caught(lambda: second.solvers.neumann(A, b, maxiter=2), Warning)
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
    _caught(run, NegativeCurvatureWarning)


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
    caught = _caught(EIGSH[entry], ConvergenceWarning)
    assert "eigsh" in str(caught[0].message)


def test_report_warns_at_its_callers_line_and_honours_an_explicit_stacklevel():
    res = second.SolveResult(
        x=torch.zeros(2), converged=False, iterations=3, matvecs=3, method="cg", message="m"
    )
    # the first frame outside second and torch: the lambda's line
    _caught(lambda: second.solvers.report(res, warn=True), ConvergenceWarning)

    # an explicit stacklevel goes to warnings.warn as it is (1: report's own line)
    caught = _recorded(lambda: second.solvers.report(res, True, stacklevel=1), ConvergenceWarning)
    assert caught[0].filename.endswith("_result.py")
    assert caught[0].lineno in _lines(second.solvers.report), caught[0].lineno
