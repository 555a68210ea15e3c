r"""Measuring an approximation against the exact answer.

Both measures take a tensor, a sequence of tensors (e.g. parameter-shaped pieces), a Python
number or a list of numbers, compare them in float64 (complex128 for complex input), and:

* refuse shapes that differ (beyond size-1 dimensions) before anything is flattened, so a
  matrix is never compared with its transpose; a flat 1-D vector may stand for any layout
  with as many entries (a sequence of tensors is flattened in order, as
  :func:`~second.parameters_to_vector` does);
* scale the vectors by their largest entry first, so entries near the float64 limits
  (1e200, 1e-200) neither overflow nor underflow;
* treat complex vectors as real vectors of twice the length: the cosine is
  :math:`\operatorname{Re}\langle a, b\rangle / (\|a\|\,\|b\|)`, so a global phase counts
  as a difference (``cosine_similarity(z, 1j * z) == 0``);
* let NaN propagate (an infinite entry gives NaN or ``inf``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .func.vectors import parameters_to_vector, safe_norm

__all__ = ["relative_error", "cosine_similarity"]

Vectors = Tensor | Sequence[Tensor] | float | Sequence[float]


def _pieces(t) -> list[Tensor]:
    """The input as a list of detached tensors (numbers and lists become one tensor)."""
    if isinstance(t, Tensor):
        return [t.detach()]
    if isinstance(t, (list, tuple)) and t and all(isinstance(e, Tensor) for e in t):
        return [e.detach() for e in t]
    x = torch.as_tensor(t)
    if x.is_complex():
        return [x.to(torch.complex128)]
    return [torch.as_tensor(t, dtype=torch.float64)]


def _squeezed(shape: torch.Size) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def _compatible(a: list[Tensor], b: list[Tensor]) -> bool:
    if len(a) == 1 and a[0].dim() == 1 or len(b) == 1 and b[0].dim() == 1:  # a flat vector
        return sum(t.numel() for t in a) == sum(t.numel() for t in b)
    return len(a) == len(b) and all(_squeezed(x.shape) == _squeezed(y.shape) for x, y in zip(a, b))


def _flat_pair(a, b) -> tuple[Tensor, Tensor]:
    """Both inputs as flat float64 (or complex128) vectors, after the shape check."""
    pa, pb = _pieces(a), _pieces(b)
    if not _compatible(pa, pb):
        raise ValueError(
            "shapes differ: "
            f"{[tuple(t.shape) for t in pa]} vs {[tuple(t.shape) for t in pb]} (a matrix is "
            "not compared with its transpose; flatten both, or pass a flat 1-D vector, to "
            "compare entries in memory order)"
        )
    complex_ = any(t.is_complex() for t in pa + pb)
    dtype = torch.complex128 if complex_ else torch.float64
    x, y = (parameters_to_vector([t.to(dtype) for t in p]) for p in (pa, pb))
    return x, y.to(x.device)


def _scale(v: Tensor) -> float:
    """The largest entry's magnitude (0 for an empty or zero vector)."""
    return float(v.abs().max()) if v.numel() else 0.0


def relative_error(approx: Vectors, exact: Vectors) -> float:
    r""":math:`\|\hat x - x\| / \|x\|`, computed in float64 (complex128 for complex input).

    See the module notes: shapes must agree, entries near the float64 limits are scaled
    first, complex vectors count their imaginary parts.

    Raises:
        ValueError: the shapes differ, or the exact vector is zero (the relative error is
            undefined).

    Example:
        >>> relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
        1.0
        >>> relative_error([2e200, 1e200], [1e200, 1e200])  # no overflow
        0.7071067811865475
    """
    a, e = _flat_pair(approx, exact)
    den = safe_norm(e)
    if den == 0:
        raise ValueError("the exact vector is zero: the relative error is undefined")
    s = max(_scale(a), _scale(e))  # a - e on the scaled vectors: no overflow near 1e308
    if not math.isfinite(s):  # NaN / Inf: let them propagate
        return safe_norm(a - e) / den
    # the ratio of the scaled norms: the numerator multiplied back by s overflowed to inf
    # (relative_error([1e308, -1e308], [-1e308, 1e308]) was inf, not 2)
    num = safe_norm(a / s - e / s)
    return num / safe_norm(e / s) if num else 0.0


def cosine_similarity(a: Vectors, b: Vectors) -> float:
    r""":math:`\operatorname{Re}\langle a, b\rangle / (\|a\| \|b\|)` in float64, in [-1, 1].

    Zero if either vector is zero.

    See the module notes: shapes must agree, entries near the float64 limits are scaled
    first, a complex vector is a real one of twice the length.

    Raises:
        ValueError: the shapes differ.

    Example:
        >>> cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        0.7071067811865475
        >>> cosine_similarity([1e-200, 1e-200], [1e-200, 0.0])  # no underflow
        0.7071067811865475
    """
    x, y = _flat_pair(a, b)
    sx, sy = _scale(x), _scale(y)
    if sx == 0 or sy == 0:
        return 0.0
    if not (math.isfinite(sx) and math.isfinite(sy)):
        return math.nan
    x, y = x / sx, y / sy
    c = float(torch.vdot(x, y).real / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)))
    return c if math.isnan(c) else min(1.0, max(-1.0, c))
