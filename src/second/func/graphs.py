r"""The engines behind the curvature-vector products: gradient graphs, HVP cores, Jacobian graphs.

* A gradient graph (``create_graph=True``) is memoized for the lifetime of its loss
  (:func:`gradient_with_graph`), so every further Hessian-vector product on the same loss costs
  one backward pass.
* :func:`hvp_from_gradient`, :func:`hvp_from_flat_gradient` and :func:`hessian_matvec` are the
  Hessian-vector cores; :class:`JacobianGraph` and :class:`GGNGraph` hold the graph of a
  network output for Jacobian and Gauss-Newton products.

The public functions :func:`second.func.hvp`, :func:`~second.func.gvp`, ... are in
:mod:`second.func.products`.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._errors import outside_stacklevel
from .checks import check_scalar_loss, grad_checked
from .vectors import parameters_to_vector, vector_to_parameters

__all__ = [
    "clear_cache",
    "gradient_with_graph",
    "flat_gradient_with_graph",
    "flatten_gradient",
    "hvp_from_flat_gradient",
    "hvp_from_gradient",
    "hessian_matvec",
    "grad_of_live",
    "JacobianGraph",
    "GGNGraph",
    "bypassing_parameters",
]

_CACHE_SIZE = 8
_graph_cache: OrderedDict[tuple, tuple[weakref.ref, object, tuple[int, ...]]] = OrderedDict()


#: The error for a memoized graph whose parameters changed in place since it was built.
STALE = (
    "a parameter was modified in place (e.g. by an optimizer step or under torch.no_grad()) "
    "after the loss was computed: the loss's graph, and the gradient graph memoized for it, "
    "still describe the old values; compute the loss again from the current parameters"
)


def _versions(params: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(p._version for p in params)


def _cached(key_tensor: Tensor, params: Sequence[Tensor], tag: str, build, keep: bool):
    """Memoize ``build()`` (tensors with graph) for the lifetime of ``key_tensor``.

    The entry records the parameters' in-place version counters: a later call after an
    in-place change raises ``ValueError`` (:data:`STALE`) instead of returning the products
    of the old graph (autograd itself misses this when the graph saved no parameter, e.g.
    ``tanh(X @ W)`` keeps ``X`` and the output).
    """
    if not keep:
        return build()
    key = (tag, id(key_tensor), tuple(id(p) for p in params))
    entry = _graph_cache.get(key)
    if entry is not None and entry[0]() is key_tensor:
        if entry[2] != _versions(params):
            raise ValueError(STALE)
        _graph_cache.move_to_end(key)
        return entry[1]
    value = build()
    _graph_cache[key] = (weakref.ref(key_tensor), value, _versions(params))
    weakref.finalize(key_tensor, _graph_cache.pop, key, None)
    while len(_graph_cache) > _CACHE_SIZE:
        _graph_cache.popitem(last=False)
    return value


def clear_cache() -> None:
    """Drop every memoized gradient graph (frees their memory at once)."""
    _graph_cache.clear()


def gradient_with_graph(
    loss: Tensor, params: Sequence[Tensor], keep: bool = True
) -> tuple[Tensor, ...]:
    r"""The gradient :math:`\nabla_\theta L` with its graph (``create_graph=True``), memoized.

    The loss is checked to be a finite scalar when the graph is built, not on every reuse;
    with ``keep`` (default) the gradient is kept while ``loss`` is alive, so later calls
    (and :func:`hvp` on the same loss) reuse it.

    Args:
        loss: scalar loss with its autograd graph.
        params: tensors to differentiate with respect to.
        keep: memoize the gradient for the lifetime of ``loss``.

    Returns:
        One tensor per parameter, differentiable once more.

    Raises:
        ValueError: a non-scalar loss or a parameter not in its graph.
        NonFiniteError: a non-finite loss.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = gradient_with_graph((w ** 3).sum(), [w])
        >>> g, g.requires_grad
        (tensor([ 3., 12.], grad_fn=<MulBackward0>), True)
    """

    def build():
        check_scalar_loss(loss)
        return grad_checked(loss, params, create_graph=True)

    return _cached(loss, params, "grad", build, keep)


def flat_gradient_with_graph(loss: Tensor, params: Sequence[Tensor], keep: bool = True):
    """Return the gradient as one flat tensor with its graph (see :func:`flatten_gradient`)."""
    return _cached(
        loss,
        params,
        "flatgrad",
        lambda: flatten_gradient(gradient_with_graph(loss, params, keep)),
        keep,
    )


def flatten_gradient(grads: Sequence[Tensor]) -> Tensor | None:
    """Concatenate a gradient (built with ``create_graph=True``) into one flat tensor.

    The concatenation stays in the graph, so a flat vector ``v`` is its own
    ``grad_outputs`` and a product needs no per-parameter split. ``None`` when no
    entry depends on the parameters (the loss is linear in them: ``H = 0``).
    """
    if not any(g.requires_grad for g in grads):
        return None
    return parameters_to_vector(grads)


def hvp_from_flat_gradient(
    gflat: Tensor | None,
    params: Sequence[Tensor],
    v: Tensor,
    *,
    retain_graph: bool = True,
    batched: bool = False,
) -> tuple[Tensor, ...]:
    """``H v`` by one backward pass of the flat gradient (``v``: ``[P]``, batched ``[k, P]``)."""
    if gflat is None:
        lead = (v.shape[0],) if batched else ()
        return tuple(p.new_zeros((*lead, *p.shape)) for p in params)
    return grad_checked(
        gflat,
        params,
        v,
        retain_graph=retain_graph,
        is_grads_batched=batched,
        zeros_for_unused=True,
    )


def hvp_from_gradient(
    grads: Sequence[Tensor],
    params: Sequence[Tensor],
    vs: Sequence[Tensor],
    *,
    retain_graph: bool = True,
    batched: bool = False,
) -> tuple[Tensor, ...]:
    r"""``H v`` from a gradient with its graph: one backward pass of :math:`\sum_i g_i \cdot v_i`.

    Args:
        grads: :math:`\nabla_\theta L`, built with ``create_graph=True`` (e.g. by
            :func:`gradient_with_graph`).
        params: the parameters it was taken with respect to.
        vs: parameter-shaped tensors (with a leading batch dimension of ``k`` columns when
            ``batched``).
        retain_graph: keep the gradient graph for further products (default ``True``).
        batched: multiply ``k`` vectors at once (one vmap-batched pass).

    Returns:
        :math:`H v`, parameter-shaped (zeros where the gradient does not depend on a
        parameter: the loss is linear in it).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> grads = gradient_with_graph((w ** 3).sum(), [w])     # H = diag(6 w)
        >>> hvp_from_gradient(grads, [w], [torch.ones(2)])
        (tensor([ 6., 12.]),)
    """
    # a gradient without a graph: the loss is linear in that parameter (H = 0 there)
    empty = tuple(torch.zeros_like(v) for v in vs)
    return grad_of_live(
        grads, params, vs, empty, retain_graph=retain_graph, is_grads_batched=batched
    )


def grad_of_live(
    outputs: Sequence[Tensor],
    inputs: Sequence[Tensor],
    grad_outputs: Sequence[Tensor],
    empty: tuple[Tensor, ...],
    **options,
) -> tuple[Tensor, ...]:
    """:func:`grad_checked` through the ``outputs`` that have a graph; ``empty`` if none has.

    The pairs ``(outputs[i], grad_outputs[i])`` whose output does not require a gradient
    are left out, and an input none of the rest depends on gets zeros (``options`` go to
    :func:`grad_checked`).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> grad_of_live([w ** 2, torch.ones(2)], [w], [torch.ones(2), torch.ones(2)], ())
        (tensor([2., 4.]),)
    """
    live = [i for i, t in enumerate(outputs) if t.requires_grad]
    if not live:
        return empty
    return grad_checked(
        [outputs[i] for i in live],
        inputs,
        [grad_outputs[i] for i in live],
        zeros_for_unused=True,
        **options,
    )


def hessian_matvec(grads: Sequence[Tensor], params: Sequence[Tensor]) -> Callable[[Tensor], Tensor]:
    r"""A flat-vector product :math:`v \mapsto H v` through an existing gradient graph.

    ``grads`` is the gradient of a loss in ``params`` built with ``create_graph=True``;
    each product is one backward pass through it (the graph is kept). Parameters the
    gradient does not depend on get zeros. Lean on purpose: it runs once per solver
    iteration, so it does not check its result (the solvers check theirs for NaN/Inf).

    Args:
        grads: the gradient with its graph.
        params: the tensors it was taken with respect to.

    Returns:
        A function of a flat ``[P]`` vector returning the flat ``[P]`` product.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> matvec = hessian_matvec(gradient_with_graph((w ** 3).sum(), [w]), [w])
        >>> matvec(torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    targets = [grads[i] for i in live]
    params = list(params)
    if len(params) == 1 and live:
        (g,), (p,) = targets, params
        shape = p.shape

        def matvec_one(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g, p, v.view(shape), retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv.reshape(-1)

        return matvec_one

    def matvec(v: Tensor) -> Tensor:
        if not live:
            return torch.zeros_like(v)
        vs = vector_to_parameters(v, params)
        out = torch.autograd.grad(
            targets, params, [vs[i] for i in live], retain_graph=True, allow_unused=True
        )
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, out)]
        )

    return matvec


class JacobianGraph:
    r"""``J v`` and ``J^T t`` for a tensor ``out`` of the parameters, on one kept graph.

    :math:`J = \partial\,\mathrm{out} / \partial\theta`. ``J^T t`` is one backward pass
    through the forward graph; ``J v`` is forward mode by the double-vjp trick: the graph
    of ``u = J^T w`` for a dummy ``w`` is built once, and ``J v`` is one backward pass of
    ``u`` with respect to ``w``. With ``batched=True`` the vectors carry a leading batch
    dimension of ``k`` columns (one vmap-batched pass).

    Args:
        out: a tensor computed from ``params``, with its graph.
        params: the tensors to differentiate with respect to.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> graph = JacobianGraph(w ** 2, [w])          # J = diag(2 w)
        >>> graph.jvp([torch.ones(2)]), graph.vjp(torch.ones(2))
        (tensor([2., 4.]), (tensor([2., 4.]),))
    """

    def __init__(self, out: Tensor, params: Sequence[Tensor]):
        self.out = out
        self.params = tuple(params)
        self.dummy = torch.zeros_like(out, requires_grad=True)
        self.u = grad_checked(out, self.params, self.dummy, create_graph=True)

    def jvp(self, vs: Sequence[Tensor], batched: bool = False) -> Tensor:
        """``J v`` (shaped like ``out``; a leading batch dimension when ``batched``)."""
        live = [i for i, u in enumerate(self.u) if u.requires_grad]
        shape = (vs[0].shape[0], *self.out.shape) if batched else self.out.shape
        if not live:
            return self.out.new_zeros(shape)
        (jv,) = torch.autograd.grad(
            [self.u[i] for i in live],
            self.dummy,
            [vs[i] for i in live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return self.out.new_zeros(shape) if jv is None else jv

    def vjp(self, t: Tensor, batched: bool = False) -> tuple[Tensor, ...]:
        """``J^T t``, parameter-shaped (zeros for parameters ``out`` does not depend on)."""
        return grad_checked(
            self.out,
            self.params,
            t,
            retain_graph=True,
            is_grads_batched=batched,
            zeros_for_unused=True,
        )


def bypassing_parameters(loss: Tensor, output: Tensor, params: Sequence[Tensor]) -> list[int]:
    r"""The indices of ``params`` the ``loss`` reaches by a path that does not pass ``output``.

    A walk of the loss's autograd graph (no backward pass) that stops at ``output``: only the
    part of the graph between the loss and the output is visited, unless another path leads
    elsewhere. Such a path, a weight-decay term ``wd * ||w||^2`` added to the loss say, is a
    part of :math:`\nabla^2_\theta L` that the Gauss-Newton matrix
    :math:`J^\top (\nabla^2_f L) J` of ``output`` does not contain.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> out = 3.0 * w
        >>> bypassing_parameters((out**2).sum(), out, [w]), bypassing_parameters(
        ...     (out**2).sum() + 0.1 * (w**2).sum(), out, [w])
        ([], [0])
    """
    stop = (output.grad_fn, output.output_nr) if output.grad_fn is not None else None
    leaves = {id(p): i for i, p in enumerate(params) if p.grad_fn is None}
    nodes = {id(p.grad_fn): i for i, p in enumerate(params) if p.grad_fn is not None}
    found: set[int] = set()
    seen: set[int] = set()
    stack = [(loss.grad_fn, loss.output_nr)]
    while stack:
        node, nr = stack.pop()
        if node is None:
            continue
        if stop is not None and node is stop[0] and nr == stop[1]:
            continue
        variable = getattr(node, "variable", None)
        if variable is not None and variable is output:
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if variable is not None and id(variable) in leaves:
            found.add(leaves[id(variable)])
        if id(node) in nodes:
            found.add(nodes[id(node)])
        stack.extend(node.next_functions)
    return sorted(found)


class GGNGraph(JacobianGraph):
    r"""The graphs a Gauss-Newton product needs, built once per (loss, output) pair.

    :class:`JacobianGraph` of the output, plus ``g_f = dL/df`` with its graph for
    :math:`(\nabla^2_f L)\, t`; :meth:`gvp` is :math:`J^\top (\nabla^2_f L) J v`.

    The loss must depend on the parameters only through ``output``: a term that reaches
    them another way (weight decay added to the loss, an auxiliary loss on a hidden layer)
    is not in :math:`J^\top (\nabla^2_f L) J`. Such paths are found by a walk of the
    loss's graph between the loss and ``output`` (no backward pass,
    :func:`bypassing_parameters`) and reported by a ``UserWarning``; add their curvature
    separately (e.g. ``wd * v`` for ``wd/2 ||w||^2``).

    Args:
        loss: scalar loss computed from ``output``.
        output: the network output, with its graph.
        params: the tensors to differentiate with respect to.

    Raises:
        ValueError: ``output`` has no graph, or the loss does not use it (e.g. a recomputed
            copy of the output was passed instead of the tensor the loss was computed from).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> f = w * 3.0                                    # J = 3 I, d2L/df2 = 2 I
        >>> GGNGraph((f ** 2).sum(), f, [w]).gvp([torch.tensor([1.0, 0.0])])
        (tensor([18.,  0.]),)
    """

    def __init__(self, loss: Tensor, output: Tensor, params: Sequence[Tensor]):
        if not isinstance(output, Tensor) or not output.requires_grad:
            raise ValueError(
                "the output (logit) has no autograd graph: pass the network output the loss "
                "was computed from, with its graph"
            )
        if not loss.requires_grad:
            raise ValueError(
                "loss does not require grad: it was computed without an autograd graph"
            )
        super().__init__(output, params)
        (g_out,) = torch.autograd.grad(loss, output, create_graph=True, allow_unused=True)
        if g_out is None:
            raise ValueError(
                "the loss does not use the output (logit) it was given: pass the very tensor "
                "the loss was computed from, not a recomputed copy or another output"
            )
        self.g_out = g_out
        bypass = bypassing_parameters(loss, output, self.params)
        if bypass:
            warnings.warn(
                f"the loss depends on parameter(s) {bypass} other than through the output "
                "(e.g. a weight-decay term added to the loss): the Gauss-Newton product "
                "J^T (d2L/df2) J leaves that part of the curvature out",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )

    @property
    def output(self) -> Tensor:
        """The network output (the ``out`` of the Jacobian)."""
        return self.out

    def output_hessian_product(self, t: Tensor, batched: bool = False) -> Tensor:
        """``(d^2 L / d f^2) t``."""
        if not self.g_out.requires_grad:  # loss linear in the output
            return torch.zeros_like(t)
        (h,) = torch.autograd.grad(
            self.g_out,
            self.out,
            t,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return torch.zeros_like(t) if h is None else h

    def gvp(self, vs: Sequence[Tensor], batched: bool = False) -> tuple[Tensor, ...]:
        """``J^T (d^2 L/d f^2) J v``: two backward passes (``J v`` and ``J^T``)."""
        return self.vjp(self.output_hessian_product(self.jvp(vs, batched), batched), batched)
