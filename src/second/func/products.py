r"""Curvature-vector products on an autograd graph (the seed's functional API).

All functions take a loss (or outputs) that still carry their autograd graph and
the parameters to differentiate with respect to, and return a flat vector (or a
tuple of parameter-shaped tensors with ``flatten=False``).

Conventions: :math:`g = \nabla_\theta L`, :math:`H = \nabla^2_\theta L`,
:math:`J = \partial f / \partial \theta` for a network output :math:`f`, and
:math:`G = J^\top (\nabla^2_f L) J` the generalized Gauss-Newton matrix.

Speed: the gradient graph of a loss (``create_graph=True``) is built once and
reused by later calls on the same loss object, so every further :func:`hvp`
costs a single extra backward pass (the first costs two).

The checks live in :mod:`second.func.checks` and the graph engines in
:mod:`second.func.graphs`; their names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, overload

import torch
from torch import Tensor

from .._deprecation import renamed_keyword

# the checks and the graph engines were defined here: every name stays importable from here
from .checks import *  # noqa: F403
from .checks import as_params, check_finite, check_flat_vector, check_scalar_loss, grad_checked
from .graphs import *  # noqa: F403
from .graphs import (
    GGNGraph,
    _cached,
    flat_gradient_with_graph,
    grad_of_live,
    gradient_with_graph,
    hvp_from_flat_gradient,
    hvp_from_gradient,
)
from .vectors import as_tensor_list, parameters_to_vector

__all__ = ["hvp", "gvp", "jvp", "vjp"]


def _finish(out: Sequence[Tensor], flatten: bool, what: str):
    flat = parameters_to_vector(out)
    check_finite(flat, what)
    return flat if flatten else tuple(out)


# ----------------------------------------------------------------------------- public API
@overload
def hvp(
    loss: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
    flatten: Literal[True] = True,
) -> Tensor: ...


@overload
def hvp(
    loss: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
    *,
    flatten: Literal[False],
) -> tuple[Tensor, ...]: ...


@overload
def hvp(
    loss: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool,
    flatten: Literal[False],
) -> tuple[Tensor, ...]: ...


def hvp(
    loss: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
    flatten: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    r"""Hessian-vector product :math:`H v` with :math:`H = \nabla^2_\theta L`.

    The gradient graph of ``loss`` is built on the first call and kept while
    ``loss`` is alive, so repeated products with the same loss (as inside a CG
    loop) cost one backward pass each.

    Args:
        loss: scalar loss with its autograd graph.
        parameters: tensors (``requires_grad=True``) to differentiate with respect to.
        vector: flat vector of length ``P`` or parameter-shaped tensors.
        retain_graph: keep the graphs for further products (default ``True``).
            With ``False`` nothing is memoized and the graph is freed.
        flatten: return a flat vector (default) or a tuple shaped like ``parameters``.

    Returns:
        :math:`H v`, flat or parameter-shaped.

    Raises:
        ValueError: non-scalar loss, a parameter without grad or not in the graph,
            a vector of the wrong size or device, or parameters modified in place since
            the gradient graph was memoized for this loss (compute the loss again).
        TypeError: a vector of the wrong dtype.
        NonFiniteError: the loss or the product is NaN/Inf.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> loss = (w ** 3).sum()            # H = diag(6 w)
        >>> hvp(loss, [w], torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
    """
    params = as_params(parameters)
    check_scalar_loss(loss, finite=False)  # finiteness: once, when the graph is built
    if isinstance(vector, Tensor):  # flat: multiply through the flat gradient, no split
        check_flat_vector(vector, params)
        gflat = flat_gradient_with_graph(loss, params, keep=retain_graph)
        out = hvp_from_flat_gradient(gflat, params, vector, retain_graph=retain_graph)
    else:
        vs = as_tensor_list(vector, params)
        grads = gradient_with_graph(loss, params, keep=retain_graph)
        out = hvp_from_gradient(grads, params, vs, retain_graph=retain_graph)
    return _finish(out, flatten, "Hessian-vector product")


@overload
def gvp(
    loss: Tensor,
    logit: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
    flatten: Literal[True] = True,
) -> Tensor: ...


@overload
def gvp(
    loss: Tensor,
    logit: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
    *,
    flatten: Literal[False],
) -> tuple[Tensor, ...]: ...


@overload
def gvp(
    loss: Tensor,
    logit: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool,
    flatten: Literal[False],
) -> tuple[Tensor, ...]: ...


def gvp(
    loss: Tensor,
    logit: Tensor,
    parameters: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    retain_graph: bool = True,
    flatten: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    r"""Generalized Gauss-Newton-vector product :math:`G v = J^\top (\nabla^2_f L) J v`.

    ``J`` is the Jacobian of the network output ``logit`` with respect to the
    parameters and :math:`\nabla^2_f L` the Hessian of the loss with respect to
    that output. ``G`` is positive semi-definite whenever the loss is convex in
    the output (MSE, cross-entropy, BCE-with-logits), unlike the Hessian.

    **The loss must depend on the parameters only through** ``logit``: a term that
    reaches them another way (weight decay added to the loss, an auxiliary loss on a
    hidden layer) is not part of :math:`G` and is left out of the product. Such a
    path is detected when the graphs are built (a walk of the loss's graph, no extra
    backward pass) and reported by a ``UserWarning``; add its curvature separately
    (``wd * v`` for a term ``wd/2 ||w||^2``).

    Args:
        loss: scalar loss computed from ``logit``.
        logit: the network output the loss was computed from (the same tensor, not a
            recomputed copy).
        parameters: tensors to differentiate with respect to.
        vector: flat or parameter-shaped.
        retain_graph: keep and memoize the graphs (default ``True``).
        flatten: flat result (default) or parameter-shaped.

    Returns:
        :math:`G v`.

    Raises:
        ValueError: a non-scalar loss, a ``logit`` without a graph or one the loss does not
            use, a parameter ``logit`` does not depend on, a bad vector, or parameters
            modified in place since the graphs were memoized for this loss.

    Warns:
        UserWarning: the loss reaches a parameter other than through ``logit``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> f = w * 3.0                       # J = 3 I
        >>> loss = (f ** 2).sum()             # d2L/df2 = 2 I, so G = 18 I
        >>> gvp(loss, f, [w], torch.tensor([1.0, 0.0]))
        tensor([18.,  0.])
    """
    params = as_params(parameters)
    check_scalar_loss(loss, finite=False)  # finiteness: once, when the graphs are built
    if not isinstance(logit, Tensor) or not logit.requires_grad:
        raise ValueError("logit must be the network output tensor, with its autograd graph")
    vs = as_tensor_list(vector, params)

    def build():
        check_scalar_loss(loss)
        return GGNGraph(loss, logit, params)

    graph = _cached(loss, (*params, logit), "ggn", build, keep=retain_graph)
    out = graph.gvp(vs)
    return _finish(out, flatten, "Gauss-Newton-vector product")


@overload
def jvp(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    create_graph: bool = False,
    retain_graph: bool = True,
    flatten: Literal[True] = True,
    **deprecated,
) -> Tensor: ...


@overload
def jvp(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    create_graph: bool = False,
    retain_graph: bool = True,
    *,
    flatten: Literal[False],
    **deprecated,
) -> tuple[Tensor, ...]: ...


@overload
def jvp(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    create_graph: bool,
    retain_graph: bool,
    flatten: Literal[False],
    **deprecated,
) -> tuple[Tensor, ...]: ...


def jvp(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor | Sequence[Tensor],
    create_graph: bool = False,
    retain_graph: bool = True,
    flatten: bool = True,
    **deprecated,
) -> Tensor | tuple[Tensor, ...]:
    r"""Jacobian-vector product :math:`J v`, :math:`J = \partial\,\mathrm{outputs} / \partial\,\mathrm{inputs}`.

    Forward-mode by the double-vjp trick on the existing graph: two backward passes,
    no re-evaluation of the function. ``jvp(gradient, parameters, v)`` is a
    Hessian-vector product.

    Args:
        outputs: a tensor or a sequence of tensors, with their graph.
        inputs: tensors they depend on.
        vector: flat or input-shaped tangent.
        create_graph: make the result differentiable.
        retain_graph: keep the graph of ``outputs`` (default ``True``).
        flatten: return one flat vector (default) or tensors shaped like ``outputs``.
        **deprecated: only the seed's misspelt ``retrain_graph``, accepted with a
            ``SecondDeprecationWarning`` (removal in 0.3); anything else is a ``TypeError``.

    Returns:
        :math:`J v`.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> jvp(x ** 2, [x], torch.tensor([1.0, 1.0]))   # J = diag(2x)
        tensor([2., 4.])
    """
    if deprecated:  # the seed's misspelling: renamed as every deprecated keyword is
        retain_graph = renamed_keyword(
            "jvp", deprecated, "retrain_graph", "retain_graph", retain_graph, default=True
        )
    params = as_params(inputs)
    vs = as_tensor_list(vector, params)
    outs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
    dummies = tuple(torch.zeros_like(o, requires_grad=True) for o in outs)
    u = grad_checked(outs, params, dummies, create_graph=True, retain_graph=True)
    empty = tuple(torch.zeros_like(o) for o in outs)
    jv = grad_of_live(u, dummies, vs, empty, retain_graph=retain_graph, create_graph=create_graph)
    if flatten:
        return parameters_to_vector(jv)
    return jv[0] if isinstance(outputs, Tensor) else jv


@overload
def vjp(
    outputs: Tensor,
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor,
    retain_graph: bool = True,
    create_graph: bool = False,
    flatten: Literal[True] = True,
) -> Tensor: ...


@overload
def vjp(
    outputs: Tensor,
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor,
    retain_graph: bool = True,
    create_graph: bool = False,
    *,
    flatten: Literal[False],
) -> tuple[Tensor, ...]: ...


@overload
def vjp(
    outputs: Tensor,
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor,
    retain_graph: bool,
    create_graph: bool,
    flatten: Literal[False],
) -> tuple[Tensor, ...]: ...


def vjp(
    outputs: Tensor,
    inputs: Tensor | Sequence[Tensor],
    vector: Tensor,
    retain_graph: bool = True,
    create_graph: bool = False,
    flatten: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    r"""Vector-Jacobian product :math:`J^\top v`: one backward pass.

    Args:
        outputs: a tensor with its graph.
        inputs: tensors it depends on.
        vector: cotangent shaped like ``outputs``.
        retain_graph: keep the graph (default ``True``).
        create_graph: make the result differentiable.
        flatten: flat result (default) or input-shaped.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> vjp(x ** 2, [x], torch.tensor([1.0, 1.0]))
        tensor([2., 4.])
    """
    params = as_params(inputs)
    if vector.shape != outputs.shape:
        raise ValueError(
            f"vector has shape {tuple(vector.shape)} but outputs have {tuple(outputs.shape)}"
        )
    out = grad_checked(
        outputs, params, vector, retain_graph=retain_graph, create_graph=create_graph
    )
    return parameters_to_vector(out) if flatten else out
