"""Newton core directions: truncated CG against dense float64 solves, forcing terms, dense Newton."""

from __future__ import annotations

import math

import pytest
import torch

from second.newton import (
    ResidualBasis,
    dense_newton_direction,
    forcing_term,
    model_cg,
    steihaug_cg,
    truncated_cg,
)

DT = torch.float64
EXACT = dict(rtol=1e-9, atol=1e-10)


def spd(n, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=DT)) @ Q.T


def test_truncated_cg_solves_the_newton_system():
    H = spd(8, 100.0)
    g = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(1))
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-12, maxiter=100)
    torch.testing.assert_close(d, -torch.linalg.solve(H, g), **EXACT)
    assert info.status == "converged" and info.matvecs == info.iterations
    assert math.isclose(info.model_decrease, -float(g @ d + 0.5 * d @ H @ d), rel_tol=1e-9)


def test_truncated_cg_forcing_term_is_the_residual_bound():
    H = spd(30, 1e4)
    g = torch.randn(30, dtype=DT, generator=torch.Generator().manual_seed(2))
    d, info = truncated_cg(lambda v: H @ v, g, tol=0.1, maxiter=100)
    assert info.status == "converged"
    assert float(torch.linalg.vector_norm(H @ d + g)) <= 0.1 * float(torch.linalg.vector_norm(g))


def test_truncated_cg_warm_start_is_used_only_when_it_decreases_the_model():
    H = spd(10, 1e3)
    g = torch.randn(10, dtype=DT, generator=torch.Generator().manual_seed(3))
    exact = -torch.linalg.solve(H, g)
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-10, maxiter=100, x0=exact)
    assert info.warm_started and info.iterations == 0 and info.matvecs == 1
    torch.testing.assert_close(d, exact, **EXACT)
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-10, maxiter=100, x0=-exact)  # uphill
    assert not info.warm_started
    torch.testing.assert_close(d, exact, **EXACT)


def test_truncated_cg_reports_and_signs_negative_curvature():
    H = torch.diag(torch.tensor([2.0, 1.0, -3.0], dtype=DT))
    g = torch.tensor([1.0, 1.0, 0.3], dtype=DT)
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-12, maxiter=10)
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
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-8, maxiter=50, M=lambda r: Hinv @ r)
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


# -------------------------------------------------------------- re-orthogonalized residuals
def _ill_conditioned(n=60, cond=1e8):
    H = spd(n, cond)
    H = 0.5 * (H + H.T)
    g = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(3))
    return H, g


def test_residual_basis_projects_off_stored_residuals_in_the_preconditioner_inner_product():
    n = 5
    M = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=DT))
    r1 = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0], dtype=DT)
    r2 = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0], dtype=DT)
    basis = ResidualBasis(torch.zeros(n, dtype=DT), preconditioned=True)
    basis.add(r1, M @ r1)
    q2 = r2 - r1 * float(r1 @ M @ r2) / float(r1 @ M @ r1)  # CG's residuals are M-orthogonal
    basis.add(q2, M @ q2)
    v = torch.tensor([3.0, -1.0, 0.5, 2.0, 1.0], dtype=DT)
    w = basis.project(v)
    # M-orthogonal to both stored residuals, and v - w in their span
    assert abs(float(r1 @ M @ w)) < 1e-12 and abs(float(r2 @ M @ w)) < 1e-12
    coef = torch.linalg.lstsq(torch.stack([r1, r2], 1), v - w).solution
    torch.testing.assert_close(torch.stack([r1, r2], 1) @ coef, v - w, **EXACT)


def test_residual_basis_respects_its_memory_and_the_dimension():
    like = torch.zeros(10, dtype=DT)
    assert ResidualBasis(like, preconditioned=False).capacity == 10  # never more than n
    assert ResidualBasis(like, preconditioned=False, memory=3 * 80).capacity == 3
    assert ResidualBasis(like, preconditioned=True, memory=3 * 80).capacity == 1
    off = ResidualBasis(like, preconditioned=False, memory=0)
    off.add(torch.ones(10, dtype=DT))
    assert off.size == 0 and torch.equal(
        off.project(torch.ones(10, dtype=DT)), torch.ones(10, dtype=DT)
    )


def test_reorthogonalized_cg_solves_an_ill_conditioned_system_in_about_n_products():
    # condition 1e8, n = 60: in floating point plain CG loses the residuals' orthogonality
    # and is still far off after 3n products; re-orthogonalized, about n suffice
    H, g = _ill_conditioned()
    n = g.numel()
    exact = -torch.linalg.solve(H, g)
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-7, maxiter=2 * n)
    assert info.status == "converged" and info.matvecs <= n + 10
    assert float(torch.linalg.vector_norm(H @ d + g)) <= 1e-7 * float(torch.linalg.vector_norm(g))
    # energy-norm error, the quantity CG minimizes
    e = d - exact
    assert float(e @ H @ e) <= 1e-10 * float(exact @ H @ exact)
    _, pinfo = truncated_cg(lambda v: H @ v, g, tol=1e-7, maxiter=3 * n, reorthogonalize=False)
    assert pinfo.status == "maxiter"


def test_reorthogonalized_cg_with_a_preconditioner_and_in_steihaug_and_model_cg():
    H, g = _ill_conditioned()
    n = g.numel()
    exact = -torch.linalg.solve(H, g)
    # a rough diagonal preconditioner: the residuals are M-orthogonal then
    Mdiag = 1.0 / torch.diagonal(H)
    d, info = truncated_cg(lambda v: H @ v, g, tol=1e-7, maxiter=2 * n, M=lambda r: Mdiag * r)
    assert info.status == "converged" and info.matvecs <= n + 10
    torch.testing.assert_close(H @ d, -g, rtol=0, atol=1e-6 * float(g.norm()))
    # Steihaug-Toint CG in a region that does not bind: the Newton step
    res = steihaug_cg(lambda v: H @ v, g, 1e6, tol=1e-7, maxiter=2 * n)
    assert res.status == "converged" and res.matvecs <= n + 10
    torch.testing.assert_close(H @ res.step, -g, rtol=0, atol=1e-6 * float(g.norm()))
    # the optimizers' inner CG (damped, here undamped)
    out = model_cg(lambda v: H @ v, g, tol=1e-7, maxiter=2 * n)
    assert out.status == "converged" and out.matvecs <= n + 10
    e = out.x - exact
    assert float(e @ H @ e) <= 1e-10 * float(exact @ H @ exact)


def test_reorthogonalized_cg_reports_an_unmet_tolerance_once_the_space_is_spanned():
    # condition 1e15: n re-orthogonalized residuals span the space before the tolerance is met;
    # the loop stops there and says "maxiter", it does not claim convergence
    n = 40
    H = spd(n, 1e15)
    H = 0.5 * (H + H.T)
    g = torch.randn(n, dtype=DT, generator=torch.Generator().manual_seed(3))
    for status in (
        truncated_cg(lambda v: H @ v, g, tol=1e-12, maxiter=10 * n)[1].status,
        steihaug_cg(lambda v: H @ v, g, 1e30, tol=1e-12, maxiter=10 * n).status,
        model_cg(lambda v: H @ v, g, tol=1e-12, maxiter=10 * n).status,
    ):
        assert status == "maxiter"


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_reorthogonalized_cg_keeps_an_operator_that_requires_grad_differentiable():
    h = torch.tensor([1.0, 4.0, 9.0], dtype=DT, requires_grad=True)
    g = torch.ones(3, dtype=DT)
    d, info = truncated_cg(lambda v: h.detach() * v + 0 * h * v, g, tol=1e-12, maxiter=10)
    assert info.status == "converged" and d.requires_grad
    torch.testing.assert_close(d.detach(), -g / h.detach(), **EXACT)
    assert steihaug_cg(lambda v: h * v, g, 10.0, tol=1e-12).status == "converged"
    assert model_cg(lambda v: h * v, g, tol=1e-12).status == "converged"
