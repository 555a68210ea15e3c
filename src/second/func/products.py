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
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._errors import NonFiniteError
from .vectors import as_tensor_list, parameters_to_vector, vector_to_parameters

__all__ = ["hvp", "gvp", "jvp", "vjp"]

_CACHE_SIZE = 8
_graph_cache: OrderedDict[tuple, tuple[weakref.ref, tuple[Tensor, ...]]] = OrderedDict()


# ----------------------------------------------------------------------------- validation
def as_params(parameters: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Validate and return parameters as a tuple of tensors that require grad."""
    if isinstance(parameters, Tensor):
        params: tuple[Tensor, ...] = (parameters,)
    elif isinstance(parameters, dict):
        params = tuple(parameters.values())
    else:
        params = tuple(parameters)
    if not params:
        raise ValueError("no parameters given (an empty sequence, or a model without parameters)")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameter {i} is a {type(p).__name__}, not a torch.Tensor")
        if not p.requires_grad:
            raise ValueError(
                f"parameter {i} (shape {tuple(p.shape)}) does not require grad; "
                "curvature is taken with respect to tensors with requires_grad=True"
            )
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise TypeError(f"parameters have mixed dtypes {sorted(map(str, dtypes))}")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"parameters are on several devices {sorted(map(str, devices))}")
    return params


def trainable_parameters(model) -> tuple[Tensor, ...]:
    """Every parameter of ``model`` with ``requires_grad``, validated by :func:`as_params`.

    Raises:
        ValueError: the model has no parameter that requires grad.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameters that require grad")
    return as_params(params)


def check_scalar_loss(loss: Tensor, finite: bool = True) -> None:
    """Raise a clear error unless ``loss`` is a scalar tensor with a graph (and finite)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"loss must be a scalar, got shape {tuple(loss.shape)} "
            "(reduce it with .mean() or .sum(), or use a loss with reduction='mean')"
        )
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: it was computed without an autograd graph")
    if finite and not math.isfinite(float(loss.detach())):
        raise NonFiniteError(f"loss is not finite ({loss.item()})")


def check_flat_vector(vector: Tensor, params: Sequence[Tensor]) -> None:
    """Raise the errors of :func:`as_tensor_list` unless ``vector`` is a flat ``[P]`` tensor."""
    p0 = params[0]
    if (
        vector.dim() != 1
        or vector.dtype != p0.dtype
        or vector.device != p0.device
        or vector.shape[0] != sum(p.numel() for p in params)
    ):
        as_tensor_list(vector, params)  # raises the precise error


def check_finite(t: Tensor, what: str) -> Tensor:
    """Return ``t``, raising :class:`NonFiniteError` if it has NaN or Inf entries."""
    # Fast path: one reduction. A NaN or Inf entry makes the sum non-finite; a sum that
    # overflows with finite entries falls through to the exact check.
    if t.numel() == 0 or (not t.is_complex() and math.isfinite(float(t.detach().sum()))):
        return t
    if not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(f"{what} has {n_bad} non-finite entries (NaN or Inf)")
    return t


def grad_checked(
    outputs: Tensor | Sequence[Tensor],
    params: Sequence[Tensor],
    grad_outputs=None,
    *,
    create_graph: bool = False,
    retain_graph: bool | None = None,
    is_grads_batched: bool = False,
    zeros_for_unused: bool = False,
) -> tuple[Tensor, ...]:
    """``torch.autograd.grad`` with clear errors for parameters that are not in the graph.

    With ``zeros_for_unused`` a parameter the outputs do not depend on gets a zero
    (used for second derivatives, where a gradient independent of a parameter is
    legitimate); otherwise it is an error naming the parameter.
    """
    out = torch.autograd.grad(
        outputs,
        params,
        grad_outputs=grad_outputs,
        create_graph=create_graph,
        retain_graph=retain_graph,
        allow_unused=True,
        is_grads_batched=is_grads_batched,
    )
    result = []
    for i, (g, p) in enumerate(zip(out, params)):
        if g is None:
            if not zeros_for_unused:
                raise ValueError(
                    f"parameter {i} (shape {tuple(p.shape)}) is not in the graph of the loss; "
                    "remove it from the parameters or check the forward pass"
                )
            if is_grads_batched:
                k = _batch_size(grad_outputs)
                g = p.new_zeros((k, *p.shape))
            else:
                g = torch.zeros_like(p)
        result.append(g)
    return tuple(result)


def _batch_size(grad_outputs) -> int:
    first = grad_outputs[0] if isinstance(grad_outputs, (list, tuple)) else grad_outputs
    return first.shape[0]


# ----------------------------------------------------------------------------- graph cache
def _cached(key_tensor: Tensor, params: Sequence[Tensor], tag: str, build, keep: bool):
    """Memoize ``build()`` (tensors with graph) for the lifetime of ``key_tensor``."""
    if not keep:
        return build()
    key = (tag, id(key_tensor), tuple(id(p) for p in params))
    entry = _graph_cache.get(key)
    if entry is not None and entry[0]() is key_tensor:
        _graph_cache.move_to_end(key)
        return entry[1]
    value = build()
    _graph_cache[key] = (weakref.ref(key_tensor), value)
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


# ----------------------------------------------------------------------------- cores
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
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    if not live:  # the loss is linear in the parameters: H = 0
        return tuple(torch.zeros_like(v) for v in vs)
    return grad_checked(
        [grads[i] for i in live],
        params,
        [vs[i] for i in live],
        retain_graph=retain_graph,
        is_grads_batched=batched,
        zeros_for_unused=True,
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


class GGNGraph(JacobianGraph):
    r"""The graphs a Gauss-Newton product needs, built once per (loss, output) pair.

    :class:`JacobianGraph` of the output, plus ``g_f = dL/df`` with its graph for
    :math:`(\nabla^2_f L)\, t`; :meth:`gvp` is :math:`J^\top (\nabla^2_f L) J v`.

    Args:
        loss: scalar loss computed from ``output``.
        output: the network output, with its graph.
        params: the tensors to differentiate with respect to.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> f = w * 3.0                                    # J = 3 I, d2L/df2 = 2 I
        >>> GGNGraph((f ** 2).sum(), f, [w]).gvp([torch.tensor([1.0, 0.0])])
        (tensor([18.,  0.]),)
    """

    def __init__(self, loss: Tensor, output: Tensor, params: Sequence[Tensor]):
        super().__init__(output, params)
        (self.g_out,) = torch.autograd.grad(loss, output, create_graph=True)

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


def _finish(out: Sequence[Tensor], flatten: bool, what: str):
    flat = parameters_to_vector(out)
    check_finite(flat, what)
    return flat if flatten else tuple(out)


# ----------------------------------------------------------------------------- public API
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
            a vector of the wrong size or device.
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

    Args:
        loss: scalar loss computed from ``logit``.
        logit: the network output the loss was computed from.
        parameters: tensors to differentiate with respect to.
        vector: flat or parameter-shaped.
        retain_graph: keep and memoize the graphs (default ``True``).
        flatten: flat result (default) or parameter-shaped.

    Returns:
        :math:`G v`.

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
            ``DeprecationWarning`` (removal in 0.3.0); anything else is a ``TypeError``.

    Returns:
        :math:`J v`.

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> jvp(x ** 2, [x], torch.tensor([1.0, 1.0]))   # J = diag(2x)
        tensor([2., 4.])
    """
    if "retrain_graph" in deprecated:
        warnings.warn(
            "jvp(retrain_graph=...) is deprecated, use retain_graph= (removal in 0.3.0)",
            DeprecationWarning,
            stacklevel=2,
        )
        retain_graph = deprecated.pop("retrain_graph")
    if deprecated:
        raise TypeError(f"jvp() got unexpected keyword arguments {sorted(deprecated)}")
    params = as_params(inputs)
    vs = as_tensor_list(vector, params)
    outs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
    dummies = tuple(torch.zeros_like(o, requires_grad=True) for o in outs)
    u = grad_checked(outs, params, dummies, create_graph=True, retain_graph=True)
    live = [i for i, t in enumerate(u) if t.requires_grad]
    if live:
        jv = torch.autograd.grad(
            [u[i] for i in live],
            dummies,
            [vs[i] for i in live],
            retain_graph=retain_graph,
            create_graph=create_graph,
            allow_unused=True,
        )
    else:
        jv = (None,) * len(outs)  # type: ignore[assignment]
    jv = tuple(torch.zeros_like(o) if t is None else t for o, t in zip(outs, jv))
    if flatten:
        return parameters_to_vector(jv)
    return jv[0] if isinstance(outputs, Tensor) else jv


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
