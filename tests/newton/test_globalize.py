"""Newton core globalization: strong-Wolfe line search, radius and damping updates."""

from __future__ import annotations

import math

import pytest

from second.newton import lm_damping_update, strong_wolfe, update_radius


def quartic(t):
    # phi(t) = (t - 2)^4 - 3 t, phi'(t) = 4 (t - 2)^3 - 3
    return (t - 2) ** 4 - 3 * t, 4 * (t - 2) ** 3 - 3, t


@pytest.mark.parametrize("t0", [1e-3, 1.0, 50.0])
def test_strong_wolfe_conditions_hold(t0):
    f0, d0, _ = quartic(0.0)
    res = strong_wolfe(quartic, f0, d0, t0=t0, c1=1e-4, c2=0.1)
    assert res.converged, res.message
    f, d, _ = quartic(res.t)
    assert f <= f0 + 1e-4 * res.t * d0
    assert abs(d) <= 0.1 * abs(d0)
    assert res.g == res.t and res.f == f


def test_strong_wolfe_shrinks_past_non_finite_values():
    def phi(t):
        if t > 0.5:
            return math.inf, math.nan, None
        return (t - 0.3) ** 2, 2 * (t - 0.3), None

    res = strong_wolfe(phi, 0.09, -0.6)
    assert res.converged and 0 < res.t <= 0.5


def test_strong_wolfe_failure_returns_zero_step():
    # a wrong slope: the function rises although phi'(0) claims descent
    res = strong_wolfe(lambda t: (1.0 + t, 1.0, None), 1.0, -1.0, max_evals=8)
    assert not res.converged and res.t == 0.0 and "no decrease" in res.message
    assert res.evaluations == 8
    with pytest.raises(ValueError, match="descent"):
        strong_wolfe(lambda t: (t, 1.0, None), 0.0, 1.0)


def test_radius_and_damping_updates():
    assert update_radius(1.0, 0.9, 1.0, True) == 2.0
    assert update_radius(1.0, 0.5, 1.0, True) == 1.0
    assert update_radius(1.0, float("nan"), 0.8, True) == 0.2
    assert lm_damping_update(1.0, 2.0, -1.0) == (2.0, 4.0)
    lam, nu = lm_damping_update(1.0, 8.0, 1.0)
    assert lam == pytest.approx(1 / 3) and nu == 2.0


def test_more_damping_update_rules_and_martens_factors():
    import math

    from second.newton import more_damping_update

    assert more_damping_update(1.0, 0.1) == 4.0  # poor step: 1 / shrink
    assert more_damping_update(1.0, 0.9) == 0.25  # very good step: shrink
    assert more_damping_update(1.0, 0.5) == 1.0
    assert more_damping_update(1.0, math.nan) == 4.0  # a NaN ratio is a poor step
    # Martens' Hessian-free rule (HessianFree's boost and drop)
    assert more_damping_update(2.0, 0.1, shrink=2 / 3, grow=1.5) == 3.0
    assert math.isclose(more_damping_update(3.0, 0.8, shrink=2 / 3, grow=1.5), 2.0)
