"""LSMR against dense float64 least squares, the normal equations and SciPy's lsmr."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import lsmr as scipy_lsmr

from conftest import DTYPES, SOLVE_TOL
from second import ConvergenceWarning, DenseOperator, JacobianOperator, LinearOperator
from second.solvers import lsmr

SHAPES = {"square-nonsymmetric": (30, 30), "tall": (50, 20), "wide": (20, 50)}
DAMPINGS = [0.0, 0.3]


def _system(shape, rank: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    if rank is not None:  # rank deficient: a product of thin factors
        A = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, n, generator=g, dtype=torch.float64
        )
    b = torch.randn(m, generator=g, dtype=torch.float64)
    return A, b


def _reference(A, b, damping: float):
    """The damped normal equations' solution, or the minimum-norm least-squares solution."""
    n = A.shape[1]
    if damping:
        return torch.linalg.solve(A.T @ A + damping * torch.eye(n, dtype=A.dtype), A.T @ b)
    return torch.linalg.pinv(A) @ b


def _relerr(x, ref) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def _rule_holds(A, b, x, damping, tol, res) -> bool:
    """The documented stopping rule, recomputed in float64 from the returned x."""
    A, b, x = A.double(), b.double(), x.double()
    r = b - A @ x
    rbar = math.sqrt(float(r @ r) + damping * float(x @ x))
    normal = float((A.T @ r - damping * x).norm())
    eps = torch.finfo(res.x.dtype).eps
    bnorm, normA = float(b.norm()), res.info["norm_A"]
    # the recomputation in float64 differs from the solver's own in the solver's dtype by
    # about the floors themselves: allow them twice
    floor1 = 2 * 20 * eps * bnorm
    floor2 = 2 * 20 * eps * normA * bnorm
    return rbar <= tol * bnorm + floor1 or normal <= tol * normA * rbar + floor2


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SHAPES)
def test_matches_dense_least_squares(case, dtype, damping):
    A, b = _system(SHAPES[case])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    res = lsmr(A.to(dtype), b.to(dtype), damping=damping, tol=tol)
    assert res.converged, res.message
    assert res.x.dtype == dtype and res.x.shape == (A.shape[1],)
    # float32: the error is the residual tolerance times the condition number
    assert _relerr(res.x, _reference(A, b, damping)) < SOLVE_TOL[dtype] * 10, res.message
    assert _rule_holds(A, b, res.x, damping, tol, res)
    assert res.matvecs == 2 * res.iterations + 3  # A^T b, two per iteration, one check
    assert len(res.residual_norms) == res.iterations + 1
    assert len(res.info["normal_residual_norms"]) == res.iterations + 1


def test_square_nonsymmetric_matches_solve_and_lstsq():
    A, b = _system((25, 25), seed=3)
    res = lsmr(DenseOperator(A), b, tol=1e-12)
    assert res.converged and res.info["stop"] == "compatible"
    torch.testing.assert_close(res.x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        res.x, torch.linalg.lstsq(A, b.unsqueeze(1)).solution[:, 0], rtol=1e-8, atol=1e-10
    )


@pytest.mark.parametrize("shape", [(40, 15), (15, 40)], ids=["tall", "wide"])
def test_rank_deficient_gives_the_minimum_norm_solution(shape):
    A, b = _system(shape, rank=5, seed=1)
    res = lsmr(A, b, tol=1e-12)
    assert res.converged, res.message
    ref = torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution[:, 0]
    torch.testing.assert_close(res.x, ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", SHAPES)
def test_matches_scipy_lsmr(case, damping):
    A, b = _system(SHAPES[case], seed=2)
    tol = 1e-10
    res = lsmr(A, b, damping=damping, tol=tol, maxiter=500)
    sp = scipy_lsmr(A.numpy(), b.numpy(), damp=math.sqrt(damping), atol=tol, btol=tol, maxiter=500)
    x, istop, itn = sp[:3]
    assert istop in (1, 2)
    np.testing.assert_allclose(res.x.numpy(), x, rtol=1e-7, atol=1e-9)
    # the same recurrences: the iteration counts differ only through the stopping tests
    assert abs(res.iterations - itn) <= 2, (res.iterations, itn)


def test_damping_with_x0_solves_the_same_problem():
    A, b = _system((30, 12), seed=4)
    ref = _reference(A, b, 0.5)
    res = lsmr(A, b, damping=0.5, x0=torch.ones(12, dtype=torch.float64), tol=1e-12)
    assert res.converged
    torch.testing.assert_close(res.x, ref, rtol=1e-8, atol=1e-10)


def test_gauss_newton_step_on_a_jacobian_operator():
    """``min ||J d - r||``: the Gauss-Newton step of a least-squares fit, matrix-free."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model = model.double()
    X = torch.randn(20, 3, dtype=torch.float64)  # 40 x 26: tall
    J = JacobianOperator(model, X)
    r = torch.randn(J.shape[0], dtype=torch.float64)
    res = lsmr(J, r, tol=1e-10, damping=1e-3)
    Jd = J.to_dense()
    assert res.converged, res.message
    torch.testing.assert_close(res.x, _reference(Jd, r, 1e-3), rtol=1e-7, atol=1e-9)


def test_trivial_cases():
    A, _ = _system((6, 4))
    res = lsmr(A, torch.zeros(6, dtype=torch.float64), x0=torch.ones(4, dtype=torch.float64))
    assert res.converged and res.matvecs == 0 and torch.equal(res.x, torch.zeros(4).double())
    # b orthogonal to the range of A: A^T b = 0, x = 0 is the least-squares solution
    A = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    res = lsmr(A, torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert res.converged and res.info["stop"] == "least_squares" and res.iterations == 0
    assert res.x.tolist() == [0.0, 0.0]
    # x0 already solves the system
    A = torch.eye(3, dtype=torch.float64) * 2
    res = lsmr(A, torch.ones(3, dtype=torch.float64), x0=torch.full((3,), 0.5).double())
    assert res.converged and res.iterations == 0 and res.matvecs == 1
    # a symmetric callable
    res = lsmr(lambda v: 2 * v, torch.ones(3, dtype=torch.float64), tol=1e-12)
    torch.testing.assert_close(res.x, torch.full((3,), 0.5, dtype=torch.float64))


def test_callback_sees_every_iterate():
    A, b = _system((20, 10))
    seen = []
    res = lsmr(A, b, tol=1e-10, callback=lambda x: seen.append(x.clone()))
    assert len(seen) == res.iterations
    torch.testing.assert_close(seen[-1], res.x)


def test_not_converged_is_reported_and_warned():
    A, b = _system((50, 20))
    with pytest.warns(ConvergenceWarning, match="did not converge in 3 iterations"):
        res = lsmr(A, b, maxiter=3)
    assert not res.converged and res.info["stop"] is None and res.iterations == 3
    assert res.residual_norms[-1] == pytest.approx(float((b - A @ res.x).norm()), rel=1e-12)
    res = lsmr(A, b, maxiter=3, warn=False)
    assert not res.converged


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_converged_always_means_the_recomputed_rule_holds(dtype):
    """The conformance invariant, on ill-conditioned systems and tolerances the dtype cannot meet."""
    converged = 0
    for seed, (shape, cond, tol, damping) in enumerate(
        [
            ((40, 40), 1e6, 1e-8, 0.0),
            ((60, 30), 1e8, 1e-10, 0.0),
            ((30, 60), 1e4, 1e-12, 0.0),
            ((60, 30), 1e6, 1e-9, 1e-6),
            ((40, 40), 1e3, 0.0, 0.0),
        ]
    ):
        g = torch.Generator().manual_seed(seed)
        m, n = shape
        U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
        k = min(m, n)
        s = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
        A = U[:, :k] @ torch.diag(s) @ V[:, :k].T
        b = torch.randn(m, generator=g, dtype=torch.float64)
        res = lsmr(A.to(dtype), b.to(dtype), damping=damping, tol=tol, warn=False)
        if res.converged:
            converged += 1
            assert _rule_holds(A, b, res.x, damping, tol, res), (seed, res.message)
        else:  # a solve that stops short says why
            assert res.message
    assert converged >= 1  # not vacuous: the reachable cases converge


def test_bad_input():
    A = torch.randn(5, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        lsmr(A, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat vector"):
        lsmr(A, b.unsqueeze(1))
    with pytest.raises(ValueError, match="damping"):
        lsmr(A, b, damping=-1.0)
    with pytest.raises(ValueError, match="tol"):
        lsmr(A, b, tol=-1.0)
    with pytest.raises(TypeError, match="complex"):
        lsmr(A.to(torch.complex128), b.to(torch.complex128))
    with pytest.raises(TypeError, match="dtype"):
        lsmr(A, b.float())
    with pytest.raises(ValueError, match="x0"):
        lsmr(A, b, x0=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        lsmr(A, torch.full((5,), float("nan"), dtype=torch.float64))

    class Forward(LinearOperator):
        def _matvec(self, v):
            return torch.cat([v, v])[:5]

    with pytest.raises(NotImplementedError, match="transposed product"):
        lsmr(Forward((5, 3), torch.float64, "cpu"), b)
