r"""Per-example gradients and curvature products with :mod:`torch.func`.

The per-example loss :math:`\ell_i` is the loss of a batch of one,
``loss_fn(model(x_i[None]), y_i[None])`` (see :mod:`second._losses`). Its gradient
for every example of a batch comes from one ``vmap(grad(...))`` over
``functional_call``: no module hooks, so any ``nn.Module`` works, including one whose
root is a single layer (a bare ``nn.Linear``).

The loss of a batch of one is not the example's share of a dataset's mean loss when
torch's mean is weighted: ``CrossEntropyLoss(weight=w)`` divides a batch of one by its own
class weight (which cancels it), a padded sequence's loss by its own number of valid
tokens, and an example whose every target is ignored has the loss 0/0 (NaN). Its term in
the mean over all the data is :math:`(W_i / W)\,\ell_i`, with :math:`W_i` what torch's
mean counts example :math:`i` as and :math:`W` their sum; :class:`second.Influence`
weighs the gradients so.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_leaves, tree_map

from .._deprecation import renamed_keyword
from .._errors import NonFiniteError, outside_stacklevel, quiet_batching_notes
from ..data import Task, as_task, call_model, map_batch
from .vectors import parameters_to_vector, vector_to_parameters

__all__ = [
    "ModelFunction",
    "per_example_gradients",
    "per_example_jacobians",
    "check_rows_finite",
    "map_examples",
    "call_model",
]

_LOOP_HINT = (
    "falling back to a loop over examples (slower). Batch norm in training mode, in-place "
    "operations on inputs and recurrent layers (nn.GRU) are the usual causes"
)


def map_examples(fn: Callable[..., Any], *args: Any) -> Any:
    """``vmap(fn)(*args)`` over the leading dimension, else ``fn`` on one example at a time.

    Some modules cannot run under :func:`torch.func.vmap` (a recurrent layer that writes
    its hidden state in place, a batch norm in training mode); their examples are then
    mapped by a Python loop, with a ``UserWarning``. An error that the loop raises as well
    is the model's own and propagates.

    Example:
        >>> map_examples(lambda x: x.sum(), torch.ones(3, 2))
        tensor([2., 2., 2.])
    """
    try:
        with quiet_batching_notes():
            return vmap(fn)(*args)
    except (RuntimeError, NotImplementedError) as err:
        warnings.warn(
            f"vmap over examples failed ({type(err).__name__}: {str(err)[:200]}); {_LOOP_HINT}",
            stacklevel=outside_stacklevel(),
        )
    n = tree_leaves(args)[0].shape[0]
    outs = [fn(*tree_map(lambda t, i=i: t[i], args)) for i in range(n)]
    return tree_map(lambda *xs: torch.stack(xs), outs[0], *outs[1:])


def check_rows_finite(G: Tensor, what: str = "example", offset: int = 0) -> Tensor:
    """Return ``G``, raising :class:`~second.NonFiniteError` if a row has NaN or Inf.

    The message names the rows (numbered from ``offset``), as ``what`` indices.
    """
    if G.numel() == 0 or bool(torch.isfinite(G).all()):
        return G
    bad = ((~torch.isfinite(G)).reshape(G.shape[0], -1).any(1)).nonzero().reshape(-1)
    rows = [offset + int(i) for i in bad[:10]]
    raise NonFiniteError(
        f"{what}(s) {rows}{' ...' if bad.numel() > 10 else ''} ({bad.numel()} in all) have a "
        "non-finite gradient: NaN or Inf in the input, the target, or the loss"
    )


def _unsqueeze(example):
    """A batch of one from an example without batch dimension (any layout)."""
    return map_batch(example, lambda t: t.unsqueeze(0))


class ModelFunction:
    r"""A model and its task seen as pure functions of a flat parameter vector.

    The one owner of per-example quantities: :meth:`gradients` is
    :math:`[\nabla_\theta \ell_i]_i` by one ``vmap(grad(...))`` over
    ``torch.func.functional_call``, and :meth:`hessian_products` multiplies one example's
    Hessian, GGN or empirical Fisher with columns (influence's leave-one-out steps use it).
    Batches are read through the :class:`~second.Task` (pairs, dicts, anything).

    Args:
        model: the network (put it in ``eval()`` mode if it has dropout or batch norm).
        task: how to run the model on a batch and take its loss (:class:`second.Task`).
        params: the trainable tensors, by name (default: every parameter with
            ``requires_grad``); other parameters and buffers are held fixed.

    Raises:
        ValueError: if the model has no trainable parameter.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> fn = ModelFunction(model, Task(torch.nn.MSELoss()))
        >>> X, y = torch.randn(3, 2), torch.randn(3, 1)
        >>> fn.gradients((X, y)).shape                     # one row per example
        torch.Size([3, 3])
    """

    def __init__(self, model: nn.Module, task: Task, params: dict[str, Tensor] | None = None):
        if params is None:
            params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(
                f"the model ({type(model).__name__}) has no parameters that require grad: "
                "there is nothing to attribute"
            )
        self.model = model
        self.task = task
        self.names = list(params)
        self.params = [params[k] for k in self.names]
        self.numel = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        trainable = set(self.names)
        self.fixed: dict[str, Tensor] = {
            k: t for k, t in model.named_parameters() if k not in trainable
        }
        self.fixed.update(dict(model.named_buffers()))
        self._vmap_ok = True
        self._forward_ok = True  # forward-over-reverse products (else reverse-over-reverse)

    # -- flat <-> dict ---------------------------------------------------------------------
    def flat(self) -> Tensor:
        """Return the current parameters as one detached flat vector."""
        return parameters_to_vector([p.detach() for p in self.params])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into the parameter dictionary ``functional_call`` wants."""
        return dict(zip(self.names, vector_to_parameters(theta, self.params), strict=True))

    def _module(self, theta: Tensor) -> Callable:
        state = {**self.fixed, **self.unflatten(theta)}
        return lambda *args, **kwargs: functional_call(self.model, state, args, kwargs)

    # -- pure functions --------------------------------------------------------------------
    def batch_loss(self, theta: Tensor, batch, measure: bool = False) -> Tensor:
        """The task's loss (or ``measure``: its measurement) of ``batch`` at ``theta``."""
        module = self._module(theta)
        if measure:
            loss = self.task.measurement(module, batch)
        else:
            loss = self.task.loss(self.task.output(module, batch), batch)
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar, got shape {tuple(loss.shape)} "
                "(use reduction='mean' or 'sum')"
            )
        return loss.reshape(())

    def example_loss(self, theta: Tensor, example, measure: bool = False) -> Tensor:
        """The loss of one example (no batch dimension) at ``theta``: a batch of one."""
        return self.batch_loss(theta, _unsqueeze(example), measure)

    def losses(self, batch) -> Tensor:
        """Per-example losses ``[b]`` at the current parameters (no graph)."""
        theta = self.flat()
        with torch.no_grad():
            return self._map(lambda ex: self.example_loss(theta, ex), batch)

    def gradients(self, batch, y: Tensor | None = None, *, measure: bool = False) -> Tensor:
        r"""Per-example gradients :math:`[\nabla \ell_i]_{i}` as a ``[b, P]`` matrix.

        ``gradients(X, y)`` is ``gradients((X, y))``; ``measure`` differentiates the task's
        measurement instead of its loss.
        """
        if y is not None:
            batch = (batch, y)
        theta = self.flat()
        g = grad(self.example_loss)
        return self._map(lambda ex: g(theta, ex, measure), batch).detach()

    def hessian_products(
        self,
        batch1,
        V: Tensor,
        curvature: str = "hessian",
        measure: bool = False,
        **deprecated,
    ) -> Tensor:
        r"""Curvature of a batch of one's loss times the columns of ``V`` (``[P, k]``).

        ``curvature="hessian"``: :math:`\nabla^2 \ell_i V`; ``"ggn"``: :math:`J_i^\top
        (\nabla_f^2 \ell_i) J_i V`; ``"fisher"``: the empirical Fisher
        :math:`\nabla\ell_i \nabla\ell_i^\top V` (one example's type-2 Fisher is its
        ``"ggn"``). ``kind`` is the deprecated spelling of ``curvature`` (removed in 0.3).

        The second derivatives are forward-over-reverse (``jvp`` of ``grad``). Where torch
        has no forward-mode derivative of a loss' backward (``F.huber_loss``) or fails in it
        (``F.mse_loss`` in torch 2.13: "ZeroTensors are immutable"), they are taken
        reverse-over-reverse instead (``vjp`` of ``grad``: the same symmetric matrix).

        Raises:
            ValueError: an unknown ``curvature``.
        """
        if deprecated:
            curvature = renamed_keyword(
                "ModelFunction.hessian_products",
                deprecated,
                "kind",
                "curvature",
                curvature,
                "hessian",
            )
        if curvature not in ("hessian", "ggn", "fisher"):
            raise ValueError(f"curvature must be 'hessian', 'ggn' or 'fisher', got {curvature!r}")
        theta = self.flat()
        if curvature == "fisher":
            gi = grad(self.batch_loss)(theta, batch1, measure)
            return gi * (gi @ V) if V.dim() == 1 else torch.outer(gi, gi @ V)
        if self._forward_ok:
            try:
                return self._second_products(theta, batch1, V, curvature, measure, True)
            except (RuntimeError, NotImplementedError):
                # retried reverse-over-reverse below; an error of the model's own raises there
                pass
        out = self._second_products(theta, batch1, V, curvature, measure, False)
        self._forward_ok = False
        return out

    def _second_products(
        self, theta: Tensor, batch1, V: Tensor, curvature: str, measure: bool, forward: bool
    ) -> Tensor:
        """:meth:`hessian_products` for the Hessian or the GGN, ``forward``-over-reverse or not."""

        def second(fn, x, v):  # the symmetric second derivative of fn at x, times v
            if forward:
                return jvp(grad(fn), (x,), (v,))[1]
            return vjp(grad(fn), x)[1](v)[0]

        if curvature == "hessian":

            def hv(v):
                return second(lambda t: self.batch_loss(t, batch1, measure), theta, v)

            return self._columns(hv, V)

        task = self.task

        def out_fn(t):
            return task.output(self._module(t), batch1)

        f0 = out_fn(theta).detach()

        def loss_of_out(f):
            return task.loss(f, batch1).reshape(())

        def gv(v):
            _, jv = jvp(out_fn, (theta,), (v,))
            hjv = second(loss_of_out, f0, jv)
            _, vjp_fn = vjp(out_fn, theta)
            return vjp_fn(hjv)[0]

        return self._columns(gv, V)

    # -- batching --------------------------------------------------------------------------
    def _columns(self, fn, V: Tensor) -> Tensor:
        if V.dim() == 1:
            return fn(V)
        try:
            with quiet_batching_notes():
                return vmap(fn, in_dims=1, out_dims=1)(V)
        except RuntimeError:
            return torch.stack([fn(V[:, j]) for j in range(V.shape[1])], dim=1)

    def _map(self, fn, batch) -> Tensor:
        if self._vmap_ok:
            try:
                with quiet_batching_notes():
                    return vmap(fn)(batch)
            except (RuntimeError, NotImplementedError) as err:
                self._vmap_ok = False
                warnings.warn(
                    f"vmap over examples failed ({type(err).__name__}: {str(err)[:200]}); "
                    f"{_LOOP_HINT}",
                    stacklevel=outside_stacklevel(),
                )
        n = self.task.batch_size(batch)
        return torch.stack([fn(self.task.take(batch, i)) for i in range(n)])


def per_example_gradients(
    model: nn.Module, loss_fn: Callable, X, y, *, batch_size: int = 256
) -> Tensor:
    r"""Gradients of every example's loss, one row per example.

    .. math:: G_{i,:} = \nabla_\theta\, \ell(f_\theta(x_i), y_i), \qquad
              \ell_i = \texttt{loss\_fn}(f_\theta(x_i[\mathrm{None}]), y_i[\mathrm{None}])

    computed as ``vmap(grad(...))`` over ``torch.func.functional_call``, ``batch_size``
    examples at a time.

    Args:
        model: any ``nn.Module`` (trainable parameters: those with ``requires_grad``).
        loss_fn: ``loss_fn(output, target)`` returning a scalar.
        X: inputs ``[n, ...]`` (or a tuple of such tensors for a multi-input model).
        y: targets ``[n, ...]``.
        batch_size: examples per vmapped call (memory ``O(batch_size * P)``).

    Returns:
        A ``[n, P]`` tensor, columns ordered as :func:`~second.parameters_to_vector`
        orders ``model.parameters()``.

    Raises:
        ValueError: if ``X`` and ``y`` have different numbers of examples, or the model
            has no trainable parameter.
        NonFiniteError: if an example's gradient has NaN or Inf entries (naming it).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(5, 3), torch.randn(5, 1)
        >>> G = per_example_gradients(model, torch.nn.MSELoss(), X, y)
        >>> G.shape
        torch.Size([5, 4])
    """
    task = as_task(None, loss_fn)
    batch = (X, y)
    task.check(batch)
    fm = ModelFunction(model, task)
    n = task.batch_size(batch)
    rows = [
        check_rows_finite(fm.gradients(task.take(batch, slice(s, s + batch_size))), "example", s)
        for s in range(0, n, batch_size)
    ]
    if not rows:
        return torch.zeros(0, fm.numel, dtype=fm.dtype, device=fm.device)
    return torch.cat(rows)


def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    return t[start:stop]


def per_example_jacobians(
    module: nn.Module, params: Sequence[Tensor], X: Any, *, batch_size: int | None = None
) -> Tensor:
    r"""Jacobians of the outputs of every example with respect to some parameters.

    .. math:: J_{i,c,:} = \partial f_\theta(x_i)_c / \partial\theta,
              \qquad f_\theta(x_i) = \texttt{module}(x_i[\mathrm{None}])[0]

    computed as ``vmap(jacrev(...))`` over ``torch.func.functional_call`` (one vectorized
    reverse pass per output), ``batch_size`` examples at a time. Parameters that are not in
    ``params`` (and buffers) are held at their values.

    Args:
        module: a network whose output for ``X [n, ...]`` is ``[n, C]``.
        params: parameters of ``module``; the columns follow their order (as
            :func:`~second.parameters_to_vector` flattens them).
        X: inputs ``[n, ...]``: a tensor, or a tuple or dict of them (the module is called
            as ``module(*X)`` / ``module(**X)``, see :func:`call_model`).
        batch_size: examples per vmapped call (default: all; memory ``O(batch_size C P)``).

    Returns:
        A detached ``[n, C, P]`` tensor.

    Raises:
        ValueError: a tensor in ``params`` that is not a parameter of ``module``, or an
            output that is not ``[n, C]``.

    Example:
        >>> lin = torch.nn.Linear(3, 2)
        >>> J = per_example_jacobians(lin, [lin.weight, lin.bias], torch.randn(5, 3))
        >>> J.shape
        torch.Size([5, 2, 8])
    """
    names = {id(p): k for k, p in module.named_parameters()}
    if any(id(p) not in names for p in params):
        raise ValueError("params must be parameters of the module")
    keys = [names[id(p)] for p in params]

    def f(theta, x):
        out = call_model(module, map_batch(x, lambda t: t.unsqueeze(0)), dict(zip(keys, theta)))
        if out.dim() != 2:
            raise ValueError(f"the module must give outputs [n, C], got {tuple(out.shape)}")
        return out[0]

    theta = tuple(p.detach() for p in params)
    leaves = tree_leaves(X)
    n = leaves[0].shape[0] if leaves and leaves[0].dim() else 0
    if n == 0:
        raise ValueError("X has no examples")
    step = n if batch_size is None else max(1, int(batch_size))
    parts = []
    with torch.enable_grad():
        for s in range(0, n, step):
            chunk = map_batch(X, partial(_rows, start=s, stop=s + step))
            Js = map_examples(lambda x: jacrev(f)(theta, x), chunk)
            m, C = Js[0].shape[:2]
            parts.append(torch.cat([J.reshape(m, C, -1) for J in Js], dim=2).detach())
    return torch.cat(parts)
