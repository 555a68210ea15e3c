"""Newton core directions: truncated CG against dense float64 solves, forcing terms, dense Newton."""

from __future__ import annotations

import math

import torch

from second.newton import dense_newton_direction, forcing_term, truncated_cg

DT = torch.float64
EXACT = dict(rtol=1e-9, atol=1e-10)


def spd(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ Q.T


def test_truncated_cg_solves_the_newton_system():
    H = spd(8, 100.0)
    g = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(1))
    d, info = truncated_cg(lambda v: H @ v, g, rtol=1e-12, maxiter=100)
    torch.testing.assert_close(d, -torch.linalg.solve(H, g), **EXACT)
    assert info.status == "converged" and info.matvecs == info.iterations
    assert math.isclose(info.model_decrease, -float(g @ d + 0.5 * d @ H @ d), rel_tol=1e-9)


def test_truncated_cg_forcing_term_is_the_residual_bound():
    H = spd(30, 1e4)
    g = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(2))
    d, info = truncated_cg(lambda v: H @ v, g, rtol=0.1, maxiter=100)
    assert info.status == "converged"
    assert float(torch.linalg.vector_norm(H @ d + g)) <= 0.1 * float(torch.linalg.vector_norm(g))


def test_truncated_cg_warm_start_is_used_only_when_it_decreases_the_model():
    H = spd(10, 1e3)
    g = torch.randn(10, dtype=DT, generator=torch.Generator().manual_seed(3))
    exact = -torch.linalg.solve(H, g)
    d, info = truncated_cg(lambda v: H @ v, g, rtol=1e-10, maxiter=100, x0=exact)
    assert info.warm_started and info.iterations == 0 and info.matvecs == 1
    torch.testing.assert_close(d, exact, **EXACT)
    d, info = truncated_cg(lambda v: H @ v, g, rtol=1e-10, maxiter=100, x0=-exact)  # uphill
    assert not info.warm_started
    torch.testing.assert_close(d, exact, **EXACT)


def test_truncated_cg_reports_and_signs_negative_curvature():
    H = torch.diag(torch.tensor([2.0, 1.0, -3.0], dtype=DT))
    g = torch.tensor([1.0, 1.0, 0.3], dtype=DT)
    d, info = truncated_cg(lambda v: H @ v, g, rtol=1e-12, maxiter=10)
    assert info.status == "negative_curvature" and info.iterations == 2
    s = info.negative_curvature
    assert math.isclose(float(s.norm()), 1.0, rel_tol=1e-12)
    assert float(g @ s) <= 0 and math.isclose(info.curvature, float(s @ H @ s), rel_tol=1e-9)
    assert info.curvature < 0
    assert float(g @ d) < 0  # still a descent direction


def test_preconditioned_truncated_cg_with_the_exact_inverse_takes_one_step():
    H = spd(12, 1e6)
    Hinv = torch.linalg.inv(H)
    g = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(4))
    d, info = truncated_cg(lambda v: H @ v, g, rtol=1e-8, maxiter=50, M=lambda r: Hinv @ r)
    assert info.iterations == 1
    torch.testing.assert_close(d, -Hinv @ g, rtol=1e-6, atol=1e-8)


def test_forcing_term_rules():
    assert forcing_term(1.0, None, None) == 0.5
    assert math.isclose(forcing_term(0.1, 1.0, 0.01), 0.9 * 0.01, rel_tol=1e-12)
    # the safeguard keeps eta from collapsing after one lucky iteration
    assert math.isclose(forcing_term(1e-3, 1.0, 0.5), 0.9 * 0.25, rel_tol=1e-12)
    assert forcing_term(10.0, 1.0, 0.5) == 0.5


def test_dense_newton_direction_flips_negative_eigenvalues():
    H = torch.diag(torch.tensor([4.0, -2.0, 1e-20], dtype=DT))
    g = torch.tensor([4.0, 2.0, 0.0], dtype=DT)
    d, info = dense_newton_direction(H, g)
    torch.testing.assert_close(d, torch.tensor([-1.0, -1.0, 0.0], dtype=DT), **EXACT)
    assert info.curvature == -2.0 and float(g @ d) < 0
    assert float(info.negative_curvature @ g) <= 0
