"""Measuring an approximation against the exact answer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .func.vectors import parameters_to_vector

__all__ = ["relative_error", "cosine_similarity"]


def _flat64_pair(
    a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    x, y = (parameters_to_vector(t).detach().to(torch.float64) for t in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    return x, y


def relative_error(approx: Tensor | Sequence[Tensor], exact: Tensor | Sequence[Tensor]) -> float:
    r""":math:`\|\hat x - x\| / \|x\|`, computed in float64.

    Example:
        >>> relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0]))
        1.0
    """
    a, e = _flat64_pair(approx, exact)
    en = torch.linalg.vector_norm(e)
    if en == 0:
        raise ValueError("the exact vector is zero: the relative error is undefined")
    return float(torch.linalg.vector_norm(a - e) / en)


def cosine_similarity(a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor]) -> float:
    r""":math:`a^\top b / (\|a\| \|b\|)`, computed in float64 (0 if either is zero).

    Example:
        >>> cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]))
        0.7071067811865475
    """
    x, y = _flat64_pair(a, b)
    den = torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y)
    return 0.0 if den == 0 else float(x @ y / den)
