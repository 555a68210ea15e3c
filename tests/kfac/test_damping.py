"""Damping helpers: validation, the pi ratio and the pi split."""

from __future__ import annotations

import math

import pytest
import torch

from second.kfac import check_damping, pi_factor, pi_split, sym_eigh


def test_pi_factor_is_the_ratio_of_normalized_traces():
    g = torch.Generator().manual_seed(0)
    B, C = (
        torch.randn(5, 7, generator=g, dtype=torch.float64),
        torch.randn(3, 4, generator=g, dtype=torch.float64),
    )
    A, G = B @ B.T, C @ C.T
    (lA, _), (lG, _) = sym_eigh(A), sym_eigh(G)
    want = math.sqrt((A.trace() / 5) / (G.trace() / 3))
    assert pi_factor(lA, lG) == pytest.approx(want, rel=1e-12)


def test_pi_factor_of_a_zero_factor_is_one():
    assert pi_factor(torch.zeros(3), torch.ones(2)) == 1.0
    assert pi_factor(torch.ones(3), torch.zeros(2)) == 1.0


def test_pi_split_product_and_ratio():
    dA, dG = pi_split(0.09, 2.0)
    assert dA * dG == pytest.approx(0.09)  # the split keeps sqrt(lam)^2 = lam
    assert dA / dG == pytest.approx(4.0)  # and the ratio pi^2
    assert pi_split(0.0, 3.0) == (0.0, 0.0)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_check_damping_refuses(bad):
    with pytest.raises(ValueError, match="damping"):
        check_damping(bad)


def test_check_damping_returns_a_float():
    assert check_damping(1) == 1.0 and isinstance(check_damping(1), float)
