"""Trust-region subproblems (second.newton.trust_region): Steihaug-Toint CG, the exact
subproblem, the boundary step and the radius update, against dense float64."""

from __future__ import annotations

import math

import pytest
import torch

from newton_cases import DT, EXACT, NORM_TOL, indefinite, model_value, spd
from second.newton.trust_region import RCOND, SteihaugPath, boundary_step, update_radius
from second.optim import (
    exact_trust_region,
    steihaug_cg,
)


def test_boundary_step_solves_the_quadratic():
    tau = boundary_step(0.25, 0.1, 2.0, 1.0)
    assert math.isclose(0.25 + 2 * 0.1 * tau + 2.0 * tau * tau, 1.0, rel_tol=1e-12)
    assert tau > 0


def test_steihaug_interior_equals_newton_step():
    H = spd(8)
    g = torch.randn(8, dtype=DT)
    res = steihaug_cg(lambda v: H @ v, g, radius=1e6, tol=1e-12)
    assert res.status == "converged"
    assert res.iterations <= 8
    torch.testing.assert_close(res.step, -torch.linalg.solve(H, g), **EXACT)
    assert math.isclose(res.predicted_reduction, -model_value(H, g, res.step), rel_tol=1e-9)


def test_steihaug_indefinite_goes_to_boundary_along_negative_curvature():
    H = torch.diag(torch.tensor([2.0, -1.0, 1.0], dtype=DT))
    g = torch.tensor([0.1, 1.0, 0.1], dtype=DT)  # g^T H g < 0: negative curvature at once
    res = steihaug_cg(lambda v: H @ v, g, radius=3.0, tol=1e-12)
    assert res.status == "negative_curvature"
    assert abs(res.step_norm - 3.0) < NORM_TOL
    assert abs(float(res.step.norm()) - 3.0) < NORM_TOL
    # the model keeps decreasing past the unconstrained stationary point, and the step is
    # the boundary point of the first CG direction d = -g (negative curvature at j = 0)
    torch.testing.assert_close(res.step, -3.0 * g / g.norm(), **EXACT)
    assert math.isclose(res.predicted_reduction, -model_value(H, g, res.step), rel_tol=1e-9)
    assert res.predicted_reduction > 0


def test_steihaug_random_indefinite_reaches_boundary_and_decreases_model():
    H = indefinite(20, seed=3)
    g = torch.randn(20, dtype=DT, generator=torch.Generator().manual_seed(4))
    res = steihaug_cg(lambda v: H @ v, g, radius=5.0, tol=1e-10)
    assert res.on_boundary
    assert abs(res.step_norm - 5.0) < NORM_TOL
    # at least the Cauchy decrease along -g
    cauchy = steihaug_cg(lambda v: H @ v, g, radius=5.0, maxiter=1)
    assert res.predicted_reduction >= cauchy.predicted_reduction - 1e-12


def test_steihaug_spd_small_radius_stops_on_boundary():
    H = spd(10)
    g = torch.randn(10, dtype=DT)
    res = steihaug_cg(lambda v: H @ v, g, radius=1e-2, tol=1e-12)
    assert res.status == "boundary"
    assert abs(float(res.step.norm()) - 1e-2) < NORM_TOL


@pytest.mark.parametrize("H", [spd(12, cond=100.0), indefinite(12, seed=5)])
@pytest.mark.parametrize("small", [1e-3, 0.3, 2.0])
def test_path_cut_equals_fresh_solve(H, small):
    g = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(7))
    big = steihaug_cg(lambda v: H @ v, g, radius=50.0, tol=1e-10)
    fresh = steihaug_cg(lambda v: H @ v, g, radius=small, tol=1e-10)
    cut = big.path.cut(small)
    assert cut.status == fresh.status
    torch.testing.assert_close(cut.step, fresh.step, **EXACT)
    assert math.isclose(cut.predicted_reduction, fresh.predicted_reduction, rel_tol=1e-8)


def test_preconditioned_steihaug_uses_the_preconditioner_norm():
    H = spd(10, cond=1e4)
    Hinv = torch.linalg.inv(H)
    g = torch.randn(10, dtype=DT)
    exact = steihaug_cg(lambda v: H @ v, g, radius=1e8, tol=1e-12, M=lambda r: Hinv @ r)
    assert exact.iterations == 1  # M = H^-1: one preconditioned CG step is Newton's step
    torch.testing.assert_close(exact.step, -Hinv @ g, **EXACT)
    res = steihaug_cg(lambda v: H @ v, g, radius=1e-3, tol=1e-12, M=lambda r: Hinv @ r)
    # the region is ||p||_{M^-1} = sqrt(p^T H p) <= radius
    assert res.on_boundary
    assert abs(math.sqrt(float(res.step @ H @ res.step)) - 1e-3) < 1e-12


def test_steihaug_rejects_bad_input():
    H = spd(3)
    with pytest.raises(ValueError):
        steihaug_cg(lambda v: H @ v, torch.ones(3, dtype=DT), radius=0.0)
    with pytest.raises(ValueError):
        steihaug_cg(lambda v: H @ v, torch.ones(3, dtype=DT), radius=1.0, M=lambda r: -r)


@pytest.mark.parametrize("radius", [0.05, 0.5, 100.0])
@pytest.mark.parametrize("kind", ["spd", "indefinite"])
def test_exact_trust_region_satisfies_optimality(radius, kind):
    H = spd(8) if kind == "spd" else indefinite(8, seed=2)
    g = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(9))
    res = exact_trust_region(H, g, radius)
    p = res.step
    assert float(p.norm()) <= radius * (1 + 1e-8)
    # Moré-Sorensen: (H + mu I) p = -g with mu >= 0, H + mu I PSD, mu (radius - ||p||) = 0
    r = H @ p + g
    mu = -float(r @ p) / float(p @ p)
    torch.testing.assert_close(H @ p + mu * p, -g, rtol=1e-6, atol=1e-8)
    assert mu >= -1e-8
    assert float(torch.linalg.eigvalsh(H + mu * torch.eye(8, dtype=DT))[0]) >= -1e-8
    # no Steihaug step does better
    st = steihaug_cg(lambda v: H @ v, g, radius=radius, tol=1e-12)
    assert res.predicted_reduction >= st.predicted_reduction - 1e-10


def test_exact_trust_region_hard_case():
    H = torch.diag(torch.tensor([-1.0, 2.0], dtype=DT))
    g = torch.tensor([0.0, 1.0], dtype=DT)  # orthogonal to the lowest eigenvector
    res = exact_trust_region(H, g, radius=2.0)
    assert abs(float(res.step.norm()) - 2.0) < NORM_TOL
    assert abs(float(res.step[0])) > 1.0  # moves along the negative-curvature direction


def test_update_radius_rules():
    assert update_radius(1.0, float("nan"), 0.5, True) == 0.125
    assert update_radius(1.0, 0.9, 1.0, True, max_radius=1.5) == 1.5
    assert update_radius(1.0, 0.9, 0.3, False) == 1.0
    assert update_radius(1.0, 0.5, 1.0, True) == 1.0


UNRESOLVED_TOL = 1e-3  # a step's walk along an unresolved direction: rounding / delta


def _singular_psd(n=6, seed=0):
    """A PSD matrix with one exact null direction q (eigenvalues 1 ... 1e3 and 0)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    lam = torch.cat([torch.zeros(1, dtype=DT), torch.logspace(0, 3, n - 1, dtype=DT)])
    return Q @ torch.diag(lam) @ Q.T, Q[:, 0]


def test_exact_trust_region_psd_singular_takes_no_hard_case_walk():
    """lambda_1 = 0 (up to rounding) and g nearly orthogonal to it: interior, not the boundary."""
    H, q = _singular_psd()
    g = torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(1))
    g = g - (g @ q) * q  # exactly orthogonal to the null direction
    res = exact_trust_region(H, g, radius=100.0)
    assert res.status == "exact"
    assert float(res.step.norm()) < 10.0  # the old hard case walked 100 along q
    # it is the minimum-norm Newton step (the pseudo-inverse) plus the rounding of g along
    # the computed null vector (~1e-13) over the smallest shift delta = 1e-12 * 1e3
    pinv_step = -torch.linalg.pinv(H, hermitian=True) @ g
    torch.testing.assert_close(res.step, pinv_step, rtol=0, atol=UNRESOLVED_TOL)
    # with that slope declared negligible the step is the pseudo-inverse step to rounding
    clean = exact_trust_region(H, g, radius=100.0, negligible=1e-10)
    torch.testing.assert_close(clean.step, pinv_step, **EXACT)


def test_exact_trust_region_drops_negligible_unresolved_slope():
    """A slope 1e-10 along an unresolved direction: dropped when negligible, followed if not."""
    H, q = _singular_psd()
    g = 1e-6 * torch.randn(6, dtype=DT, generator=torch.Generator().manual_seed(2))
    g = g - (g @ q) * q + 1e-10 * q
    newton = -torch.linalg.pinv(H, hermitian=True) @ g  # has no component along q
    delta = RCOND * 1e3  # the smallest shift: rcond times the largest eigenvalue
    kept = exact_trust_region(H, g, radius=0.5)
    dropped = exact_trust_region(H, g, radius=0.5, negligible=1e-9)
    # followed: the slope over the smallest shift, 1e-10 / 1e-9, a walk of 0.1 along q
    assert math.isclose(float((kept.step @ q).abs()), 1e-10 / delta, rel_tol=1e-3)
    # dropped: the step is the Newton step on the rest, with no component along q
    torch.testing.assert_close(dropped.step, newton, **EXACT)
    assert float((dropped.step @ q).abs()) < 1e-12
    assert dropped.status == "exact"
    # the predicted reduction is the model's (the dropped slope moves nothing)
    assert math.isclose(dropped.predicted_reduction, -model_value(H, g, dropped.step), rel_tol=1e-9)
    # a slope above the threshold is not dropped
    again = exact_trust_region(H, g, radius=0.5, negligible=1e-11)
    torch.testing.assert_close(again.step, kept.step, **EXACT)


def test_exact_trust_region_reuses_a_given_eigendecomposition():
    H = indefinite(8, seed=5)
    g = torch.randn(8, dtype=DT, generator=torch.Generator().manual_seed(6))
    eig = torch.linalg.eigh(0.5 * (H + H.T))
    for radius in (0.1, 1.0, 100.0):
        a = exact_trust_region(H, g, radius)
        b = exact_trust_region(H, g, radius, eig=eig)
        torch.testing.assert_close(a.step, b.step, **EXACT)


@pytest.mark.parametrize("scale", [0.0, 1e-300, 1e-200], ids=["zero", "1e-300", "1e-200"])
@pytest.mark.parametrize("radius", [1e-3, 1.0, 1e6])
def test_exact_trust_region_on_a_zero_or_negligible_hessian_steps_to_the_boundary(scale, radius):
    """H = 0 crashed: the shift floor rcond * 1e-300 is subnormal, c / shift overflowed and
    the step came out NaN ("the trust-region radius must be > 0, got nan" one step later)."""
    H = scale * spd(5, seed=3)
    g = torch.randn(5, dtype=DT, generator=torch.Generator().manual_seed(4))
    res = exact_trust_region(H, g, radius)
    boundary = -radius * g / g.norm()  # the minimizer of the linear model in the region
    torch.testing.assert_close(res.step, boundary, **EXACT)
    assert res.status == "boundary" and abs(res.step_norm - radius) <= NORM_TOL * radius
    assert math.isclose(res.predicted_reduction, radius * float(g.norm()), rel_tol=1e-12)


def test_exact_trust_region_with_a_small_but_resolved_hessian_is_still_exact():
    """The linear shortcut applies only below rounding: H = 1e-12 I, radius 1e6 is solved."""
    H = 1e-12 * torch.eye(3, dtype=DT)
    g = torch.tensor([1e-9, 0.0, 0.0], dtype=DT)
    res = exact_trust_region(H, g, 1e6)
    torch.testing.assert_close(res.step, torch.tensor([-1e3, 0.0, 0.0], dtype=DT), **EXACT)
    assert res.status == "exact"


def test_exact_trust_region_zero_hessian_and_gradient_is_a_zero_step():
    res = exact_trust_region(torch.zeros(3, 3, dtype=DT), torch.zeros(3, dtype=DT), 1.0)
    assert float(res.step.norm()) == 0.0 and res.predicted_reduction == 0.0


@pytest.mark.parametrize("H", [spd(12, cond=100.0), indefinite(12, seed=5)])
@pytest.mark.parametrize("radius", [1e-3, 0.3, 50.0])
def test_the_running_cut_is_the_paths_own_cut(H, radius):
    # steihaug_cg's step is the one its path keeps while it is built; replaying the path's
    # segments from zero (a path without a radius) gives the same bits, and a second cut at
    # the same radius (after the running one was handed over) too
    g = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(7))
    res = steihaug_cg(lambda v: H @ v, g, radius=radius, tol=1e-10)
    replay = SteihaugPath(g)
    for segment in res.path.segments:
        assert replay.add(*segment) is False  # no radius: nothing is tracked
    replay.end_status = res.path.end_status
    for again in (replay.cut(radius), res.path.cut(radius)):
        assert again.status == res.status
        assert torch.equal(again.step, res.step)
        assert again.predicted_reduction == res.predicted_reduction


def test_steihaug_stops_at_a_non_finite_norm():
    # a product whose curvature along d is finite but so small that alpha overflows: the
    # running norm is not finite, CG stops on that segment instead of carrying NaNs on
    H = torch.diag(torch.tensor([1e-310, 1.0], dtype=DT))
    g = torch.tensor([1.0, 0.0], dtype=DT)
    res = steihaug_cg(lambda v: H @ v, g, radius=2.0, tol=1e-12, maxiter=5)
    assert res.iterations == 1 and res.matvecs == 1
    assert res.status == "boundary"
    assert torch.isfinite(res.step).all()
    torch.testing.assert_close(res.step, torch.tensor([-2.0, 0.0], dtype=DT), **EXACT)
