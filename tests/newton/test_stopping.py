"""Newton core stopping rules."""

from __future__ import annotations

import math

from second.newton import Criteria, diverging_iterates


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
