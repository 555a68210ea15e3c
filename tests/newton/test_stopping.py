"""Newton core stopping rules."""

from __future__ import annotations

import math

import torch

from second.newton import Criteria, diverging_iterates
from second.newton.stopping import limit_message, safe_norm

NORM_RTOL = 1e-15  # a norm scaled by its largest entry: a few roundings


def test_criteria_order():
    c = Criteria(gtol=1e-6, maxiter=5, deadline=10.0)
    assert c.check(it=0, f=math.nan, gnorm=0.0, now=0.0, xnorms=[1.0]) == "nonfinite"
    assert c.check(it=9, f=1.0, gnorm=1e-7, now=99.0, xnorms=[1.0]) == "converged"
    assert c.check(it=5, f=1.0, gnorm=1.0, now=0.0, xnorms=[1.0]) == "maxiter"
    assert c.check(it=1, f=1.0, gnorm=1.0, now=11.0, xnorms=[1.0]) == "time"
    assert c.check(it=1, f=1.0, gnorm=1.0, now=0.0, xnorms=[1.0]) is None
    grow = [1.0] + [2.0**k for k in range(1, 25)]  # geometric growth over two windows
    assert c.check(it=1, f=1.0, gnorm=1.0, now=0.0, xnorms=grow) == "unbounded"
    c.detect_unbounded = False
    assert c.check(it=1, f=1.0, gnorm=1.0, now=0.0, xnorms=grow) is None


def test_diverging_iterates_needs_growth_and_monotonicity():
    assert not diverging_iterates([1.0] + [200.0] * 12)  # large but not growing
    bumpy = [1.0] + [100.0 + k for k in range(12)]
    bumpy[-3] = 1e4
    assert not diverging_iterates(bumpy)
    assert diverging_iterates([1.0] + [100.0 + k for k in range(12)], factor=50)


def test_geometric_growth_applies_only_while_the_gradient_is_steep():
    """The geometric form needs ||g|| >= unbounded_gfloor * ||g_0|| (default 1e-2)."""
    c = Criteria(gtol=1e-8, maxiter=100)
    assert c.unbounded_gfloor == 1e-2
    grow = [1.0] + [2.0**k for k in range(1, 25)]
    falls = [25.0 - k for k in range(25)]  # f falls steadily: the levelling-off form is silent
    steep = dict(it=1, f=1.0, now=0.0, xnorms=grow, fvals=falls, gnorm0=1.0)
    assert c.check(gnorm=0.02, **steep) == "unbounded"
    assert c.check(gnorm=0.005, **steep) is None  # reduced 200-fold: converging far out


def test_accelerating_decrease_with_geometric_growth_is_unbounded():
    """f -> -inf ever faster while ||x|| grows geometrically (-||x||^2 under a doubling trust
    radius): neither the levelling-off nor the slowing form could see it."""
    c = Criteria(gtol=1e-8, maxiter=1000)
    xs = [1.0] + [2.0**k for k in range(1, 25)]
    fs = [-(x**2) for x in xs]
    run = dict(it=24, f=fs[-1], now=0.0, xnorms=xs, fvals=fs, gnorm0=2.0)
    assert c.check(gnorm=2 * xs[-1], **run) == "unbounded"
    assert c.check(gnorm=2 * xs[-1], ray=lambda: False, **run) is None  # the ray must agree
    assert c.check(gnorm=2 * xs[-1], ray=lambda: True, **run) == "unbounded"
    assert c.check(gnorm=1e-3, **run) is None  # the gradient fell 2000-fold: converging
    assert c.falls_without_bound(fs)


def test_accelerating_form_needs_f_far_below_its_start():
    c = Criteria(gtol=1e-8, maxiter=1000)
    xs = [1.0] + [2.0**k for k in range(1, 25)]
    fs = [100.0 - 1e-3 * (x**2) / xs[-1] ** 2 for x in xs]  # accelerating, but 1e-3 in all
    assert not c.falls_without_bound(fs)
    assert c.check(it=24, f=fs[-1], gnorm=1.0, now=0.0, xnorms=xs, fvals=fs, gnorm0=1.0) is None


def test_limit_message_says_whether_the_gradient_fell_or_grew():
    assert "fell from 1.000e+00 to 1.000e-03" in limit_message(5, [1.0, 1e-3])
    grew = limit_message(5, [1.0, 1e3])
    assert "grew from 1.000e+00 to 1.000e+03" in grew and "fell" not in grew
    assert "bounded below" in grew
    none = limit_message(0, [2.0], gtol=1e-6)
    assert "fell" not in none and "||grad|| = 2.000e+00 > gtol = 1.0e-06" in none


def test_safe_norm_neither_overflows_nor_underflows():
    big = torch.tensor([1e200, 1e200], dtype=torch.float64)
    assert math.isinf(float(torch.linalg.vector_norm(big)))  # what the loops used
    assert math.isclose(safe_norm(big), math.sqrt(2) * 1e200, rel_tol=NORM_RTOL)
    tiny = torch.tensor([3e-200, 4e-200], dtype=torch.float64)
    assert math.isclose(safe_norm(tiny), 5e-200, rel_tol=NORM_RTOL)
    assert safe_norm(torch.zeros(3)) == 0.0
    assert math.isnan(safe_norm(torch.tensor([1.0, math.nan])))
    assert math.isinf(safe_norm(torch.tensor([1.0, math.inf])))
