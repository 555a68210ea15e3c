"""second.func.checks: the finiteness flags the optimizers' safeguards use."""

from __future__ import annotations

import pytest
import torch

from second.func.checks import finite_flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_finite_flags_finds_each_kind_of_non_finite_entry(dtype):
    good = torch.randn(7, 5).to(dtype)
    bad = []
    for value in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(7, 5).to(dtype)
        t[3, 2] = value
        bad.append(t)
    both = torch.randn(4).to(dtype)
    both[0], both[1] = float("inf"), -float("inf")  # a sum of inf - inf is NaN: still flagged
    flags = finite_flags([good, *bad, both, torch.zeros(0, dtype=dtype)])
    assert flags.dtype == torch.bool
    assert flags.tolist() == [True, False, False, False, False, True]


def test_finite_flags_errs_on_the_safe_side_only_near_overflow():
    big = torch.full((4,), 1e30)  # a 2-norm overflows here (sum of squares 4e60), a sum does not
    assert finite_flags([big]).tolist() == [True]
    huge = torch.full((4,), 3e38)  # the sum overflows: reported as non-finite
    assert finite_flags([huge]).tolist() == [False]
    assert finite_flags([]).tolist() == []
    # half precision is summed in float32: a float16 tensor whose sum passes 65504 is finite
    assert finite_flags([torch.full((1000,), 100.0, dtype=torch.float16)]).tolist() == [True]
