"""Conversions between flat vectors and parameter-shaped tensor lists."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "parameters_to_vector",
    "vector_to_parameters",
    "add_vector_to_parameters",
    "columns_to_parameters",
    "parameters_to_columns",
    "as_tensor_list",
    "column_norms",
    "safe_norm",
]


def parameters_to_vector(parameters: Iterable[Tensor] | Tensor) -> Tensor:
    """Flatten and concatenate tensors into one vector.

    Unlike :func:`torch.nn.utils.parameters_to_vector` this keeps the autograd
    graph, accepts ``None`` entries (treated as zeros is *not* done: ``None`` is
    an error, because a missing gradient means the parameter is not in the graph)
    and accepts a single tensor.

    Args:
        parameters: a tensor or an iterable of tensors.

    Returns:
        A 1-D tensor of length ``sum(p.numel())``.

    Raises:
        ValueError: if the iterable is empty or holds ``None``.

    Example:
        >>> parameters_to_vector([torch.ones(2, 2), torch.zeros(3)])
        tensor([1., 1., 1., 1., 0., 0., 0.])
    """
    if isinstance(parameters, Tensor):
        return parameters.reshape(-1)
    tensors = parameters if isinstance(parameters, (list, tuple)) else list(parameters)
    try:  # the checks only on failure: this is on the optimizers' per-product path
        return torch.cat([t.reshape(-1) for t in tensors])
    except Exception:
        if not tensors:
            raise ValueError("parameters_to_vector got an empty sequence of tensors") from None
        for i, t in enumerate(tensors):
            if t is None:
                raise ValueError(
                    f"entry {i} is None: a gradient is None when its parameter is not in the "
                    "graph of the loss (pass allow_unused=True to autograd, or drop that "
                    "parameter)"
                ) from None
        raise


def vector_to_parameters(vector: Tensor, parameters: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Split a flat vector into tensors shaped like ``parameters``.

    This *returns* views of ``vector`` (it does not write into the parameters, as
    :func:`torch.nn.utils.vector_to_parameters` does), so it is differentiable.

    Args:
        vector: a 1-D tensor with ``sum(p.numel() for p in parameters)`` entries.
        parameters: tensors whose shapes are used.

    Returns:
        A tuple of tensors, one per parameter, with the parameter's shape.

    Raises:
        ValueError: if the sizes do not match.

    Example:
        >>> a, b = vector_to_parameters(torch.arange(5.0), [torch.empty(2, 2), torch.empty(1)])
        >>> a.shape, b
        (torch.Size([2, 2]), tensor([4.]))
    """
    parameters = parameters if isinstance(parameters, (list, tuple)) else list(parameters)
    if vector.dim() != 1:
        raise ValueError(f"vector must be 1-D, got shape {tuple(vector.shape)}")
    out = []
    offset = 0
    try:  # the size is checked after the split (one pass: the optimizers' per-product path)
        for p in parameters:
            n = p.numel()
            out.append(vector[offset : offset + n].view_as(p))  # a third of view(shape)'s cost
            offset += n
    except RuntimeError:  # a piece past the end of a vector that is too short
        if sum(p.numel() for p in parameters) == vector.numel():
            raise
        offset = -1
    if offset != vector.numel():
        total = sum(p.numel() for p in parameters)
        raise ValueError(
            f"vector has {vector.numel()} entries but the parameters have {total} in total"
        )
    return tuple(out)


def add_vector_to_parameters(
    vector: Tensor, parameters: Sequence[Tensor], *, alpha: float = 1.0
) -> None:
    """Add ``alpha * vector`` to the parameters in place, without recording it in autograd.

    The in-place counterpart of :func:`vector_to_parameters`: ``vector`` is split by the
    parameters' shapes (the order of :func:`parameters_to_vector`) and each piece is added
    to its parameter with ``p.add_(piece, alpha=alpha)`` under :func:`torch.no_grad`, so
    leaf parameters that require grad can be updated (an optimizer step).

    Args:
        vector: a 1-D tensor with ``sum(p.numel() for p in parameters)`` entries.
        parameters: the tensors to update.
        alpha: the factor on ``vector`` (default 1).

    Raises:
        ValueError: if the sizes do not match.

    Example:
        >>> a, b = torch.zeros(2, 2, requires_grad=True), torch.ones(1, requires_grad=True)
        >>> add_vector_to_parameters(torch.arange(5.0), [a, b], alpha=-1.0)
        >>> a, b
        (tensor([[ 0., -1.],
                [-2., -3.]], requires_grad=True), tensor([-3.], requires_grad=True))
    """
    parameters = list(parameters)
    with torch.no_grad():
        for p, piece in zip(parameters, vector_to_parameters(vector, parameters)):
            p.add_(piece, alpha=alpha)


def columns_to_parameters(matrix: Tensor, parameters: Sequence[Tensor]) -> list[Tensor]:
    """Split the ``k`` columns of a ``[P, k]`` matrix into ``[k, *p.shape]`` tensors.

    The batched form of :func:`vector_to_parameters`: entry ``i`` of the result holds,
    for every column, the rows of parameter ``i`` (the layout of ``is_grads_batched``
    and ``vmap``).

    Args:
        matrix: a ``[P, k]`` tensor, ``P = sum(p.numel())``.
        parameters: tensors whose shapes are used.

    Returns:
        A list of ``[k, *p.shape]`` tensors.

    Raises:
        ValueError: if ``matrix`` is not 2-D with ``P`` rows.

    Example:
        >>> V = torch.arange(6.0).reshape(3, 2)          # P = 3 rows, k = 2 columns
        >>> a, b = columns_to_parameters(V, [torch.empty(2), torch.empty(1)])
        >>> a
        tensor([[0., 2.],
                [1., 3.]])
        >>> b
        tensor([[4.],
                [5.]])
    """
    total = sum(p.numel() for p in parameters)
    if matrix.dim() != 2 or matrix.shape[0] != total:
        raise ValueError(
            f"matrix must be [{total}, k] for these parameters, got {tuple(matrix.shape)}"
        )
    k = matrix.shape[1]
    out, offset = [], 0
    for p in parameters:
        n = p.numel()
        out.append(matrix[offset : offset + n].T.reshape(k, *p.shape))
        offset += n
    return out


def parameters_to_columns(tensors: Sequence[Tensor]) -> Tensor:
    """Join ``[k, *p.shape]`` tensors into a ``[P, k]`` matrix.

    The inverse of :func:`columns_to_parameters`.

    Args:
        tensors: one ``[k, ...]`` tensor per parameter, the same ``k`` for all.

    Returns:
        A ``[P, k]`` tensor.

    Example:
        >>> a, b = torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[4.0], [5.0]])
        >>> parameters_to_columns([a, b])
        tensor([[0., 2.],
                [1., 3.],
                [4., 5.]])
    """
    k = tensors[0].shape[0]
    return torch.cat([t.reshape(k, -1) for t in tensors], dim=1).T


def as_tensor_list(vector: Tensor | Sequence[Tensor], parameters: Sequence[Tensor]) -> list[Tensor]:
    """Return ``vector`` as a list of parameter-shaped tensors, validating it.

    Args:
        vector: a flat tensor, or a sequence of tensors shaped like ``parameters``.
        parameters: the reference tensors.

    Raises:
        ValueError: on a size or shape mismatch.
        TypeError: on a dtype mismatch.
    """
    if isinstance(vector, Tensor):
        _check_like(vector, parameters[0], "vector")
        return list(vector_to_parameters(vector, parameters))
    vs = list(vector)
    if len(vs) != len(parameters):
        raise ValueError(f"vector has {len(vs)} tensors but there are {len(parameters)} parameters")
    for i, (v, p) in enumerate(zip(vs, parameters)):
        if v.shape != p.shape:
            raise ValueError(
                f"vector entry {i} has shape {tuple(v.shape)}, its parameter {tuple(p.shape)}"
            )
        _check_like(v, p, f"vector entry {i}")
    return vs


def _check_like(v: Tensor, p: Tensor, what: str) -> None:
    if v.dtype != p.dtype:
        raise TypeError(f"{what} has dtype {v.dtype} but the parameters have {p.dtype}")
    if v.device != p.device:
        raise ValueError(f"{what} is on {v.device} but the parameters are on {p.device}")


def wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms and inner products accumulate in: float64 (complex128 for complex)."""
    return torch.complex128 if dtype.is_complex else torch.float64


def column_norms(V: Tensor) -> Tensor:
    """Euclidean norms of the columns of ``V``, accumulated in float64 (a float64 tensor).

    The sum of squares of float32 entries of ``1e-23`` underflows to 0 in float32; in
    float64 it does not, so a small but normal vector keeps its norm (and a solver's ``tol``
    stays relative). A column whose float64 sum of squares still under- or overflows
    (entries below ``1e-154`` or above ``1e154``) is scaled by its largest entry first: a
    norm is 0 only for a zero column. NaN for a column with a NaN, ``inf`` for one with an
    infinite entry. The library's one overflow-safe norm (:func:`safe_norm` for one vector).

    Example:
        >>> column_norms(torch.tensor([[3.0, 1e200], [4.0, 1e200]], dtype=torch.float64))
        tensor([ 5.0000e+00, 1.4142e+200], dtype=torch.float64)
    """
    n = torch.linalg.vector_norm(V, dim=0, dtype=wide(V.dtype)).to(torch.float64)
    suspect = (n == 0) | torch.isinf(n)
    if bool(suspect.any()):  # rare: only then look at the entries again
        W = V[:, suspect].to(wide(V.dtype))
        m = W.abs().amax(0)
        ok = (m > 0) & torch.isfinite(m)
        scaled = torch.linalg.vector_norm(W[:, ok] / m[ok], dim=0) * m[ok]
        idx = suspect.nonzero().flatten()[ok]
        n[idx] = scaled.to(torch.float64)
    return n


def safe_norm(v: Tensor) -> float:
    r""":math:`\|v\|_2` as a float that neither overflows nor underflows for finite entries.

    :func:`column_norms` of the flattened ``v``: NaN if an entry is NaN, ``inf`` if one is
    infinite (or the norm itself exceeds the largest float).

    Example:
        >>> safe_norm(torch.full((4,), 1e200, dtype=torch.float64))  # vector_norm: inf
        2e+200
        >>> safe_norm(torch.zeros(3))
        0.0
    """
    if v.numel() == 0:
        return 0.0
    v = v.detach()
    if v.dtype == torch.float64:  # the common case on a hot path: one reduction, one sync
        n = float(torch.linalg.vector_norm(v))
        if 1e-140 < n < math.inf:  # its squares neither overflowed nor underflowed
            return n
    return float(column_norms(v.reshape(-1, 1))[0])
