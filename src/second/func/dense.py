r"""Exact dense curvature matrices for small models (also the tests' oracle).

Each matrix is built column-block by column-block with batched (``vmap``)
products against the identity: ``chunk_size`` columns per backward pass instead
of one Python-level backward per parameter. Memory is ``O(chunk_size * P)`` on
top of the ``P x P`` result.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._errors import outside_stacklevel
from .._progress import progress
from .products import (
    GGNGraph,
    as_params,
    check_finite,
    check_scalar_loss,
    grad_checked,
    gradient_with_graph,
    hvp_from_gradient,
)
from .vectors import (
    columns_to_parameters,
    parameters_to_columns,
    parameters_to_vector,
    vector_to_parameters,
)

__all__ = [
    "exact_hessian",
    "exact_ggn",
    "exact_fisher",
    "dense_from_matmat",
    "eigenvalue_cutoff",
]


def dense_from_matmat(
    matmat: Callable[[Tensor], Tensor],
    matvec: Callable[[Tensor], Tensor] | None,
    shape: int | tuple[int, int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Assemble a matrix from its batched product: :math:`A = [A e_1, \dots, A e_n]`.

    ``matmat(E)`` returns ``A E`` for a block ``E`` of ``k`` columns of the identity
    (``n x k``); ``chunk_size`` columns are multiplied at a time. Falls back to ``matvec``
    column by column (with a warning) if the batched product is not supported by some
    operation in the graph. The one owner of dense assembly: operators' ``to_dense``, the
    exact curvature matrices and influence's dense curvature call it.

    Args:
        matmat: the batched product.
        matvec: the product with one vector (``None``: no fall-back).
        shape: ``n`` for a square ``n x n`` matrix, or ``(m, n)``.
        dtype: the dtype of the identity columns and of the result.
        device: their device.
        chunk_size: columns per product (default ``None``: all at once).

    Returns:
        The ``m x n`` matrix.

    Raises:
        RuntimeError: the batched product failed for another reason than batching.

    Example:
        >>> A = torch.arange(6.0).reshape(2, 3)
        >>> dense_from_matmat(lambda E: A @ E, None, (2, 3), dtype=A.dtype,
        ...                   device=A.device, chunk_size=2)
        tensor([[0., 1., 2.],
                [3., 4., 5.]])
    """
    m, n = (shape, shape) if isinstance(shape, int) else (int(shape[0]), int(shape[1]))
    chunk = n if chunk_size is None else max(1, min(chunk_size, n))
    out = torch.empty((m, n), dtype=dtype, device=device)
    try:
        for start in progress(range(0, n, chunk), desc="dense", unit="block"):
            stop = min(start + chunk, n)
            eye = torch.zeros((n, stop - start), dtype=dtype, device=device)
            eye[torch.arange(start, stop), torch.arange(stop - start)] = 1
            out[:, start:stop] = matmat(eye)
    except RuntimeError as err:
        if matvec is None or "batch" not in str(err).lower() and "vmap" not in str(err).lower():
            raise
        warnings.warn(
            f"batched product failed ({err}); assembling the matrix column by column",
            stacklevel=outside_stacklevel(),
        )
        for i in range(n):
            e = torch.zeros(n, dtype=dtype, device=device)
            e[i] = 1
            out[:, i] = matvec(e)
    return out


def eigenvalue_cutoff(
    eigenvalues: Tensor,
    n: int | None = None,
    dtype: torch.dtype | None = None,
    rcond: float | None = None,
) -> float:
    r"""The pseudo-inverse cutoff: eigenvalues with :math:`|\lambda| \le` this are zero.

    One policy for every pseudo-inverse and dense solve in ``second`` (``docs/glossary.md``,
    *cutoff*):

    .. math:: \mathrm{cutoff} = \mathrm{rcond} \cdot \max_i |\lambda_i|, \qquad
              \mathrm{rcond} = \max\big(n\, \varepsilon_{\mathrm{float64}},\
              \varepsilon_{\mathrm{dtype}}\big) \ \text{by default},

    with ``n`` the matrix size and ``dtype`` the precision the matrix was computed in (its
    entries carry that dtype's rounding even when the eigendecomposition runs in float64).

    Args:
        eigenvalues: the eigenvalues (or singular values) of the matrix.
        n: the matrix size (default: the number of eigenvalues).
        dtype: the dtype the matrix was computed in (default: ``eigenvalues.dtype``).
        rcond: the relative cutoff (default: the rule above).

    Returns:
        The absolute cutoff, a float (``0.0`` for an empty spectrum).

    Raises:
        ValueError: a negative or NaN ``rcond``.

    Example:
        >>> lam = torch.tensor([1.0, 1e-20, 2.0], dtype=torch.float64)
        >>> cut = eigenvalue_cutoff(lam)            # 3 * eps(float64) * 2
        >>> (lam.abs() > cut).tolist()
        [True, False, True]
    """
    if rcond is not None and not rcond >= 0:
        raise ValueError(f"rcond must be >= 0, got {rcond}")
    if eigenvalues.numel() == 0:
        return 0.0
    size = eigenvalues.numel() if n is None else int(n)
    source = dtype if dtype is not None else eigenvalues.dtype
    real = torch.empty(0, dtype=source).real.dtype if source.is_complex else source
    if rcond is None:
        rcond = max(size * torch.finfo(torch.float64).eps, torch.finfo(real).eps)
    return float(rcond) * float(eigenvalues.abs().max())


def exact_hessian(
    loss: Tensor, parameters: Tensor | Sequence[Tensor], *, chunk_size: int | None = 256
) -> Tensor:
    r"""The dense Hessian :math:`\nabla^2_\theta L` (``P x P``), for small models.

    Args:
        loss: scalar loss with its autograd graph.
        parameters: tensors to differentiate with respect to.
        chunk_size: columns per batched backward pass (default 256); ``None`` for all.

    Returns:
        The symmetric ``P x P`` Hessian in the parameters' dtype, ordered as
        :func:`parameters_to_vector` orders the parameters.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> exact_hessian((w[0] * w[1]) ** 2, [w])
        tensor([[8., 8.],
                [8., 2.]])
    """
    params = as_params(parameters)
    check_scalar_loss(loss)
    grads = gradient_with_graph(loss, params)
    n = sum(p.numel() for p in params)

    def matmat(E: Tensor) -> Tensor:
        vs = columns_to_parameters(E, params)
        return parameters_to_columns(hvp_from_gradient(grads, params, vs, batched=True))

    def matvec(e: Tensor) -> Tensor:
        vs = vector_to_parameters(e, params)
        return parameters_to_vector(hvp_from_gradient(grads, params, vs))

    H = dense_from_matmat(
        matmat, matvec, n, dtype=params[0].dtype, device=params[0].device, chunk_size=chunk_size
    )
    return check_finite(H, "Hessian")


def exact_ggn(
    loss: Tensor,
    output: Tensor,
    parameters: Tensor | Sequence[Tensor],
    *,
    chunk_size: int | None = 256,
) -> Tensor:
    r"""The dense generalized Gauss-Newton matrix :math:`J^\top (\nabla^2_f L) J`.

    Args:
        loss: scalar loss computed from ``output``.
        output: the network output (with its graph).
        parameters: tensors to differentiate with respect to.
        chunk_size: columns per batched product.

    Returns:
        The symmetric ``P x P`` GGN.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> f = (w * torch.tensor([1.0, 3.0])).sum()
        >>> exact_ggn(0.5 * f ** 2, f, [w])   # J = [1, 3], d2L/df2 = 1
        tensor([[1., 3.],
                [3., 9.]])
    """
    params = as_params(parameters)
    check_scalar_loss(loss)
    graph = GGNGraph(loss, output, params)
    n = sum(p.numel() for p in params)

    def matmat(E: Tensor) -> Tensor:
        vs = columns_to_parameters(E, params)
        return parameters_to_columns(graph.gvp(vs, batched=True))

    def matvec(e: Tensor) -> Tensor:
        return parameters_to_vector(graph.gvp(vector_to_parameters(e, params)))

    G = dense_from_matmat(
        matmat, matvec, n, dtype=params[0].dtype, device=params[0].device, chunk_size=chunk_size
    )
    return check_finite(G, "GGN")


def exact_fisher(
    losses: Tensor,
    parameters: Tensor | Sequence[Tensor],
    *,
    reduction: str = "mean",
) -> Tensor:
    r"""The dense empirical Fisher :math:`w \sum_i \nabla \ell_i \nabla \ell_i^\top`.

    Args:
        losses: the vector of per-example losses ``[N]`` (e.g. a loss with
            ``reduction='none'``, summed over non-batch dimensions), with its graph.
        parameters: tensors to differentiate with respect to.
        reduction: ``"mean"`` (``w = 1/N``, the default, matching a mean-reduced
            training loss) or ``"sum"`` (``w = 1``).

    Returns:
        The ``P x P`` empirical Fisher.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> X = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> exact_fisher(X @ w, [w])          # per-example gradients are the rows of X
        tensor([[0.5000, 0.0000],
                [0.0000, 0.5000]])
    """
    params = as_params(parameters)
    if losses.dim() != 1:
        raise ValueError(
            f"losses must be a vector of per-example losses, got {tuple(losses.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    N = losses.shape[0]
    eye = torch.eye(N, dtype=losses.dtype, device=losses.device)
    per_example = grad_checked(losses, params, eye, retain_graph=True, is_grads_batched=True)
    Gm = torch.cat([g.reshape(N, -1) for g in per_example], dim=1)
    w = 1.0 / N if reduction == "mean" else 1.0
    return check_finite(w * Gm.T @ Gm, "empirical Fisher")
