"""The implicit-differentiation warnings point at the caller's line, whichever entry point
reached them: hypergradient, iMAML's meta_gradient, an implicit_root's backward (through
.backward(), autograd.grad, create_graph=True). solve_symmetric's fixed stacklevel=4 put the
negative-curvature warning one frame above the caller of hypergradient / meta_gradient, and its
unconverged-CG report inside torch's autograd under an implicit_root."""

from __future__ import annotations

import pytest
import torch

from second import ConvergenceWarning, NegativeCurvatureWarning, hypergradient, imaml
from second.implicit import implicit_root, stationary
from warning_lines import caught_at, spectrum_matrix

N = 12


ILL = spectrum_matrix(1.0, 1e4, N)  # two CG iterations do not converge
INDEFINITE = spectrum_matrix(-1.0, 5.0, N)  # CG meets negative curvature: MINRES fallback
WELL = spectrum_matrix(1.0, 2.0, N)
H0 = torch.linspace(1.0, 2.0, N, dtype=torch.float64)


def _inner(A):
    return lambda w, h: 0.5 * w @ A @ w - h @ w  # w* = A^-1 h


def _outer(w, h):
    return (w**2).sum() + w.sum()


def _root_of(A, **options):
    """An implicit_root solver of the quadratic inner problem (exact for a nonsingular A)."""

    @implicit_root(stationary(_inner(A)), **options)
    def solve(h):
        return torch.linalg.solve(A, h)

    return solve


CASES = {  # (matrix, options, category, match)
    "negative curvature": (INDEFINITE, {}, NegativeCurvatureWarning, "switching to MINRES"),
    "unconverged auto": (ILL, dict(maxiter=2), ConvergenceWarning, "cg: did not converge"),
    "unconverged cg": (ILL, dict(method="cg", maxiter=2), ConvergenceWarning, "cg:"),
    "unconverged minres": (ILL, dict(method="minres", maxiter=2), ConvergenceWarning, "minres:"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hypergradient_warns_at_the_callers_line(case):
    A, options, category, match = CASES[case]
    w = torch.linalg.solve(A, H0)
    caught_at(lambda: hypergradient(_inner(A), _outer, w, H0.clone(), **options), category, match)


@pytest.mark.parametrize("case", list(CASES))
def test_hypergradient_of_imamls_proximal_problem_warns_at_the_callers_line(case):
    A, options, category, match = CASES[case]
    lam = 0.5  # I + A/lam keeps A's negative curvature
    inner = imaml.proximal(lambda w: 0.5 * w @ A @ w, lam)
    theta = torch.ones(N, dtype=torch.float64)
    w = torch.linalg.solve(torch.eye(N, dtype=A.dtype) + A / lam, theta)
    caught_at(lambda: hypergradient(inner, _outer, w, theta, **options), category, match)


@pytest.mark.parametrize("case", list(CASES))
def test_imaml_meta_gradient_warns_at_the_callers_line(case):
    A, options, category, match = CASES[case]
    task, test = (lambda w: 0.5 * w @ A @ w), (lambda w: w.sum())
    theta = torch.ones(N, dtype=torch.float64)
    caught_at(lambda: imaml.meta_gradient(task, test, theta, lam=0.5, **options), category, match)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("entry", ["backward", "autograd.grad", "create_graph"])
def test_an_implicit_roots_backward_warns_at_the_callers_line(case, entry):
    A, options, category, match = CASES[case]
    solve = _root_of(A, **options)
    h = H0.clone().requires_grad_()

    def backward():
        if entry == "backward":
            _outer(solve(h), h).backward()
        else:
            torch.autograd.grad(_outer(solve(h), h), h, create_graph=entry == "create_graph")

    caught_at(backward, category, match)


def test_an_unsolved_inner_problem_warns_at_the_callers_line():
    w = torch.zeros(N, dtype=torch.float64)  # far from A^-1 h
    caught_at(
        lambda: hypergradient(_inner(WELL), _outer, w, H0.clone()),
        ConvergenceWarning,
        "inner problem is not solved",
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_an_implicit_roots_output_that_is_not_a_root_warns_at_the_callers_line(symmetric):
    @implicit_root(stationary(_inner(WELL)), symmetric=symmetric)
    def solve(h):
        return torch.zeros_like(h)  # not the root

    h = H0.clone().requires_grad_()
    caught_at(lambda: _outer(solve(h), h).backward(), ConvergenceWarning, "not a root")
