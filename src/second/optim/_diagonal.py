r"""Diagonal curvature estimates, and the shell of Sophia and AdaHessian.

:func:`hutchinson_diagonal` (:math:`z \odot Hz`) and :func:`gnb_diagonal`
(Gauss-Newton-Bartlett, :math:`\hat g \odot \hat g` with targets sampled from the model);
:class:`DiagonalHessianOptimizer` runs torch.optim's closure, differentiates the loss itself and
asks for an estimate every ``update_period`` steps. Under ``torch.distributed`` the estimates
are averaged over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from .. import distributed as dist
from ..func import differentiable_attention
from ..func.products import grad_checked
from ..kfac import curvature_columns
from ._closure import ClosureCall, call_closure, warn_closure_misuse
from ._options import check_int
from ._preconditioned import PreconditionedOptimizer, all_reduce_mean

__all__ = [
    "DiagonalHessianOptimizer",
    "rademacher",
    "hutchinson_diagonal",
    "gnb_diagonal",
    "closure_gradients",
]


def rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Independent signs ``+-1`` shaped and typed like ``like``."""
    r = torch.randint(0, 2, like.shape, generator=generator, device=like.device)
    return (2 * r - 1).to(like.dtype)


def hutchinson_diagonal(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], generator: torch.Generator | None
) -> list[Tensor]:
    r"""Hutchinson's estimate :math:`z \odot H z` of the Hessian diagonal, :math:`z` Rademacher.

    Unbiased: :math:`\mathbb E[z_i (Hz)_i] = \sum_j H_{ij}\mathbb E[z_i z_j] = H_{ii}`. One
    Hessian-vector product through ``grads`` (built with ``create_graph=True``).

    Args:
        grads: the gradient, with its graph; ``None`` (or a gradient without a graph) for a
            parameter the loss does not use: its estimate is zero (and ``None`` draws no
            signs).
        params: the parameters it was taken with respect to.
        generator: the generator of the signs.

    Returns:
        One detached estimate per parameter.

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> (g,) = torch.autograd.grad((w ** 3).sum(), [w], create_graph=True)
        >>> hutchinson_diagonal([g], [w], torch.Generator().manual_seed(0))  # exact: diagonal H
        [tensor([ 6., 12.])]
    """
    # a parameter without a gradient draws no signs (the others' are those drawn without
    # it); a gradient without a graph (a parameter the loss does not use, or uses linearly)
    # has a zero Hessian row, and so (by symmetry) a zero column: its estimate is 0, exactly
    zs: list[Tensor | None] = [
        None if g is None else rademacher(p, generator) for p, g in zip(params, grads)
    ]
    out = [torch.zeros_like(p) for p in params]
    live: list[tuple[int, Tensor, Tensor]] = [
        (i, g, z)
        for i, (g, z) in enumerate(zip(grads, zs))
        if g is not None and z is not None and g.requires_grad
    ]
    if live:
        hz = grad_checked(
            [g for _, g, _ in live],
            [params[i] for i, _, _ in live],
            [z for _, _, z in live],
            retain_graph=True,
            zeros_for_unused=True,
        )
        for (i, _, z), h in zip(live, hz):
            out[i] = (z * h).detach()
    return out


def gnb_diagonal(
    output: Tensor,
    loss_fn: Callable,
    params: Sequence[Tensor],
    generator: torch.Generator | None,
    target: Tensor | None = None,
) -> list[Tensor]:
    r"""The Gauss-Newton-Bartlett estimate :math:`\hat g \odot \hat g` of the GGN diagonal.

    With targets :math:`\tilde y_i` sampled from the model's predictive and :math:`s_i`
    the matching curvature column (:func:`second.kfac.curvature_columns`, ``fisher="mc"``;
    :math:`\mathbb E[s_i s_i^\top]` is the output Hessian of example :math:`i` and
    :math:`\mathbb E[s_i] = 0`), :math:`\hat g = \sum_i J_i^\top s_i` (one backward pass) has
    :math:`\mathbb E[\hat g \hat g^\top] = \sum_i J_i^\top \mathbb E[s_i s_i^\top] J_i`, the
    GGN of the loss as written (``w = 1/N`` for a mean, 1 for a sum); so
    :math:`\hat g \odot \hat g` is an unbiased estimate of its diagonal (Liu et al. 2023,
    Algorithm 2, where the mean's :math:`B` is written out).

    Args:
        output: the network output ``f [N, ...]`` with its graph.
        loss_fn: the training loss (``nn.MSELoss``, ``nn.CrossEntropyLoss`` or
            ``nn.BCEWithLogitsLoss``, mean or sum).
        params: the parameters.
        generator: the generator of the sampled targets.
        target: the loss' targets, where they weigh the terms (ignored ones:
            ``ignore_index``; :func:`second._losses.target_weights`).

    Returns:
        One detached estimate per parameter.

    Raises:
        NotImplementedError: a loss without a known output curvature.

    Example:
        >>> net = torch.nn.Linear(2, 1)
        >>> f = net(torch.ones(4, 2))
        >>> est = gnb_diagonal(f, torch.nn.MSELoss(), list(net.parameters()), None)
        >>> [tuple(e.shape) for e in est]
        [(1, 2), (1,)]
    """
    reduction = getattr(loss_fn, "reduction", "mean")
    # the Monte-Carlo columns use the targets only for their weights (ignored, class weights)
    S = curvature_columns(loss_fn, output, target, reduction, "mc", 1, generator)[0]
    w = 1.0 / output.shape[0] if reduction == "mean" else 1.0
    g = grad_checked(
        output, list(params), S.to(output.dtype), retain_graph=True, zeros_for_unused=True
    )
    return [(gi.detach() * gi.detach()) * w for gi in g]


def closure_gradients(
    owner: str, closure: Callable, params: Sequence[Tensor], *, create_graph: bool
) -> tuple[ClosureCall, tuple[Tensor | None, ...], list[Tensor | None]]:
    """Run a closure under torch.optim's contract and differentiate its loss here.

    The closure's ``backward()`` is deferred (:func:`second.optim._closure.call_closure`): the
    gradient is taken once, with its graph when ``create_graph`` (a Hessian-vector product
    follows), and written to ``.grad`` detached, averaged over the ranks under
    torch.distributed (DDP's hooks only run in ``backward()``). A parameter the loss does not
    use (on any rank) gets no gradient: ``None``, and its ``.grad`` is left as the closure
    left it (``None`` after ``zero_grad()``), as ``backward()`` leaves it.

    Returns:
        ``(call, grads, kept)``: the closure call (its loss with the graph kept), the
        gradients (with their graph when asked; ``None`` where unused) and the detached
        gradients written to ``.grad`` (``None`` where unused on every rank).
    """
    res = call_closure(owner, closure, graph=True, params=params)
    if not params:  # every parameter frozen: nothing to differentiate
        return res, (), []
    grads = torch.autograd.grad(
        res.loss, list(params), create_graph=create_graph, retain_graph=True, allow_unused=True
    )
    with torch.no_grad():
        kept: list[Tensor | None] = [None if g is None else g.detach().clone() for g in grads]
        if dist.active():
            # the loss is differentiated here, not by backward(), so DDP's hooks do not
            # average the gradient: it is averaged over the ranks now, with the same tensors
            # on every rank (zeros where unused here) and a flag per parameter: used anywhere
            full = [torch.zeros_like(p) if k is None else k for p, k in zip(params, kept)]
            used = torch.tensor(
                [float(k is not None) for k in kept], dtype=full[0].dtype, device=full[0].device
            )
            all_reduce_mean([*full, used])
            flags = used.tolist()
            kept = [k if u > 0 else None for k, u in zip(full, flags)]
        for p, k in zip(params, kept):
            if k is not None:
                p.grad = k
    return res, grads, kept


class DiagonalHessianOptimizer(PreconditionedOptimizer):
    """Shell of Sophia and AdaHessian: a diagonal curvature estimate every ``update_period`` steps.

    ``step(closure)`` runs the closure with its ``backward()`` deferred, differentiates the
    loss once (with the graph a Hessian-vector product needs, on the steps that estimate),
    leaves the gradient in ``.grad``, asks :meth:`_estimate` for the diagonal, averages it
    over the ranks and hands everything to ``_propose``. ``counters`` holds ``n_steps``
    (committed steps) and ``n_refused``.

    A parameter without a gradient (one the loss does not use, as ``backward()`` would leave
    it) is skipped, as torch.optim does: no step, no state. A subclass whose update needs an
    estimate (:meth:`_needs_estimate`: AdaHessian's) gets one on a parameter's first step
    even off the ``update_period`` schedule (a parameter added, unfrozen or used late), at the
    cost of one more gradient with its graph and one Hessian-vector product on that step.
    """

    _estimator = "hutchinson"

    def _check_group(self, group: dict) -> None:
        super()._check_group(group)
        check_int("update_period", group["update_period"])

    def _check_added(self, group: dict) -> None:
        super()._check_added(group)
        if group["update_period"] != self.param_groups[0]["update_period"]:
            raise ValueError("update_period must be the same in every parameter group")

    def _trainable(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _due(self) -> bool:
        period = self.param_groups[0]["update_period"]
        return int(self.counters.get("n_steps", 0)) % period == 0

    def _needs_estimate(self, p: Tensor) -> bool:
        """Whether ``p`` cannot be stepped before its first estimate (default: it can)."""
        return False

    def _propose(
        self, p: Tensor, grad: Tensor, estimate: Tensor | None, group: dict
    ) -> tuple[Tensor, dict]:
        """The update of ``p`` and its proposed state (each optimizer defines it)."""
        raise NotImplementedError

    def _estimate(
        self, loss: Tensor | None, grads: Sequence[Tensor | None], params: list[Tensor]
    ) -> list[Tensor]:
        """Hutchinson's diagonal (override for another estimator).

        ``loss`` is ``None`` when the gradients came from ``.grad`` rather than a closure;
        a ``None`` gradient is a parameter the loss does not use.
        """
        return hutchinson_diagonal(grads, params, self.generator(params[0].device))

    def _gradients(self, closure: Callable | None, due: bool):
        """``(loss, params, grads, estimate or None, estimated)`` from the closure or ``.grad``.

        ``grads`` has ``None`` for a parameter without a gradient; ``estimated`` lists the
        parameters the estimate is for, in its order: ``params``, or off the schedule the
        late ones whose first estimate is taken now (only their gradient is differentiated).
        """
        params = self._trainable()
        owner = type(self).__name__
        if not params:  # every parameter frozen: the closure's loss, nothing to step
            if closure is None:
                return None, params, [], None, None
            with torch.enable_grad():
                res = call_closure(owner, closure, graph=True)
            return res.loss.detach(), params, [], None, None
        waiting = set() if due else {p for p in params if self._needs_estimate(p)}
        hutchinson = self._estimator == "hutchinson"
        if closure is not None:
            second_order = due and hutchinson
            # a Hessian-vector product through attention needs the math kernel
            attention = second_order or bool(waiting)
            with torch.enable_grad(), differentiable_attention() if attention else nullcontext():
                res, grads, kept = closure_gradients(
                    owner, closure, params, create_graph=second_order
                )
                warn_closure_misuse(self, res)
                loss = res.loss
                targets = params
                if not due:
                    late = {p for p, k in zip(params, kept) if k is not None and p in waiting}
                    if not late:
                        return loss.detach(), params, kept, None, None
                    # their first step: their first estimate, now, for them alone (a
                    # gradient with its graph and a product through their part of the model)
                    targets = [p for p in params if p in late]
                    grads = torch.autograd.grad(
                        loss, targets, create_graph=True, retain_graph=True, allow_unused=True
                    )
                if not self._finite(grads, params[0].device):
                    return loss.detach(), params, kept, None, None
                est = self._estimate(loss, grads, targets)
            return loss.detach(), params, kept, est, targets
        current = [p.grad for p in params]
        live = [g for g in current if g is not None]
        late = {p for p, g in zip(params, current) if g is not None and p in waiting}
        if not due and not late:
            return None, params, current, None, None
        if not hutchinson:
            raise RuntimeError(
                f"{owner} estimates its Hessian diagonal from the model's outputs: pass a "
                "closure to step() (torch.optim's contract: zero the gradients, compute the "
                "loss, call loss.backward(), return the loss)"
            )
        if any(g.grad_fn is None for g in live):
            if due:
                raise RuntimeError(
                    f"{owner} needs the gradient's graph for its Hessian estimate: pass a "
                    "closure to step(), or call loss.backward(create_graph=True) before step()"
                )
            # a parameter's first estimate needs the graph too: it waits (not stepped)
            return None, params, current, None, None
        targets, used = params, current
        if not due:  # the late parameters' first estimates, for them alone
            targets = [p for p in params if p in late]
            used = [p.grad for p in targets]
        with torch.enable_grad():
            est = self._estimate(None, used, targets)
        detached = [None if g is None else g.detach() for g in current]
        for p, g in zip(params, detached):
            if g is not None:
                p.grad = g
        return None, params, detached, est, targets

    @torch.no_grad()
    def step(  # type: ignore[override]  # the loss is returned as a tensor
        self, closure: Callable | None = None
    ) -> Tensor | None:
        """One step; ``closure`` follows torch.optim's contract and its loss is returned.

        Raises:
            RuntimeError: a curvature estimate is due and neither a closure nor a gradient
                with its graph (``loss.backward(create_graph=True)``) was given.
        """
        due = self._due()
        loss, params, grads, est, estimated = self._gradients(closure, due)
        if not params:
            return loss
        device = params[0].device
        pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
        if not self._finite([g for _, g in pairs], device):
            self._refuse("a gradient has NaN or Inf entries")
            return loss
        if est is not None:
            all_reduce_mean(est)
            if not self._finite(est, device):
                self._refuse("the curvature estimate has NaN or Inf entries")
                return loss
        estimate = dict(zip(estimated, est)) if est is not None else {}
        index = {p: i for i, p in enumerate(params)}
        ps, updates, states = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p not in index or grads[index[p]] is None:
                    continue
                if p not in estimate and self._needs_estimate(p):
                    continue  # no estimate yet (without a closure: no graph): it waits
                u, ns = self._propose(p, grads[index[p]], estimate.get(p), group)
                ps.append(p)
                updates.append(u)
                states.append(ns)
        if not self._finite(
            updates + [t for ns in states for t in ns.values() if isinstance(t, Tensor)], device
        ):
            self._refuse("the update has NaN or Inf entries")
            return loss
        self._commit(ps, updates, states)
        self.counters["n_steps"] = int(self.counters.get("n_steps", 0)) + 1
        return loss
