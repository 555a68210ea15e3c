"""second.relative_error and second.cosine_similarity (second/metrics.py) at the edges: shapes,
the float64 range, complex input, rounding above 1, plain Python numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from second import cosine_similarity, relative_error

DT = torch.float64
ROUNDING = 1e-15  # float64 measures of two-entry vectors: a few roundings
SQRT_HALF = math.sqrt(0.5)


@pytest.mark.parametrize("measure", [relative_error, cosine_similarity])
def test_a_matrix_is_not_compared_with_its_transpose(measure):
    """Only the sizes were compared, after flattening: relative_error(A, A.T) = 0.426."""
    A = torch.arange(1.0, 7.0, dtype=DT).reshape(2, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        measure(A, A.T)
    with pytest.raises(ValueError, match="shapes differ"):
        measure([A, A], [A.T, A.T])
    # a flat vector stands for any layout with as many entries; size-1 dims do not matter
    assert (
        measure(A.reshape(-1), A)
        == measure(A, A.reshape(1, 2, 3))
        == (0.0 if measure is relative_error else 1.0)
    )


@pytest.mark.parametrize("scale", [1e200, 1e-200, 1.0])
def test_no_overflow_or_underflow_near_the_float64_limits(scale):
    """At 1e200 both gave NaN; at 1e-200 the cosine said 0 ("a zero vector") and the relative
    error raised "the exact vector is zero"."""
    a = torch.tensor([2.0, 1.0], dtype=DT) * scale
    e = torch.tensor([1.0, 1.0], dtype=DT) * scale
    assert math.isclose(relative_error(a, e), SQRT_HALF, rel_tol=ROUNDING)
    assert relative_error(e, e) == 0.0
    b = torch.tensor([1.0, 0.0], dtype=DT) * scale
    assert math.isclose(cosine_similarity(e, b), SQRT_HALF, rel_tol=ROUNDING)
    assert math.isclose(cosine_similarity(e, e), 1.0, rel_tol=ROUNDING)


def test_cosine_never_exceeds_one():
    v = torch.full((1000,), 0.1, dtype=DT)  # the dot product rounds above the norms' product
    assert cosine_similarity(v, v) == 1.0
    assert cosine_similarity(v, -v) == -1.0


def test_complex_input_counts_the_imaginary_part():
    """The imaginary part was dropped: relative_error(z, conj z) was 0."""
    z = torch.tensor([1 + 1j, 1 - 1j], dtype=torch.complex128)
    assert math.isclose(relative_error(z, z.conj()), math.sqrt(2.0), rel_tol=ROUNDING)
    assert relative_error(z, z) == 0.0
    assert cosine_similarity(z, z) == 1.0
    assert cosine_similarity(z, 1j * z) == 0.0  # a global phase is a difference
    assert cosine_similarity(z, -z) == -1.0


def test_plain_numbers_and_numpy_arrays_are_accepted():
    """A list of floats raised AttributeError ('float' object has no attribute 'reshape')."""
    assert math.isclose(relative_error([1.0, 2.0], [1.0, 1.0]), SQRT_HALF, rel_tol=ROUNDING)
    assert relative_error(np.array([0.1, 0.2]), [0.1, 0.2]) == 0.0  # float64, not float32
    assert cosine_similarity(2.0, 3.0) == 1.0


def test_zero_and_nan_keep_their_documented_results():
    with pytest.raises(ValueError, match="exact vector is zero"):
        relative_error(torch.ones(2), torch.zeros(2))
    assert cosine_similarity(torch.zeros(2), torch.ones(2)) == 0.0
    nan = torch.tensor([math.nan, 1.0], dtype=DT)
    assert math.isnan(relative_error(nan, torch.ones(2, dtype=DT)))
    assert math.isnan(cosine_similarity(nan, torch.ones(2, dtype=DT)))


def test_relative_error_near_the_float64_limit():
    # the numerator multiplied back by its scale overflowed: inf and NaN for finite inputs
    from second.metrics import relative_error

    assert relative_error([1e308, -1e308], [-1e308, 1e308]) == 2.0
    assert abs(relative_error([1.7e308, 1.7e308], [1.7e308, -1.7e308]) - 2**0.5) < 1e-15
