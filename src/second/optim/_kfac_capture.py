"""The KFAC optimizer's attributes, and the hooks that gather its curvature statistics.

:class:`KFACAttributes` declares what :class:`second.optim.KFAC`'s constructor sets and its
helpers read; :class:`KFACCapture` holds the forward hooks (the batch statistics, the
captured batch and activations of the quadratic model, the loss of the damping adaptation).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import outside_stacklevel
from .._losses import label_smoothing, target_weights
from ..func.forward import RandomState
from ..kfac import (
    Capture,
    DiagonalRule,
    FactorStats,
    ForwardWatch,
    KroneckerBlock,
    LayerRule,
    add_layer_statistics,
    batch_statistics,
    curvature_columns,
    nonfinite_rows,
)
from ._kfac_quadratic import dropout_mask
from ._views import LossView, depends_on, loss_input, loss_on_output, loss_point, path_kind


@dataclass(eq=False)
class _Forward:
    """One training forward of the step, until its loss call and ``backward()``.

    ``out``: its output (while a cross-entropy loss call may still come: until the loss call
    or the step); ``this``: its statistics (``None``: left to the loss call, ``deferred``);
    ``snap``: its layer calls, while the loss call may re-do them; ``emp``: the empirical
    Fisher's backward hooks of this forward.
    """

    out: Tensor | None = None
    this: FactorStats | None = None
    snap: Capture | None = None
    deferred: bool = False
    emp: _Empirical | None = None
    seen: bool = False  # a call of the loss module came from this output


@dataclass(eq=False)
class _Empirical:
    """The empirical Fisher's backward hooks of one forward: ``n`` rows added to ``stats``.

    ``cancel()`` (its loss call re-does the statistics) takes the rows back and makes the
    hooks add nothing.
    """

    stats: FactorStats
    n: int
    active: bool = True

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self.stats.n -= self.n


class KFACAttributes(torch.optim.Optimizer):
    """The attributes set by :class:`second.optim.KFAC`'s constructor (declarations only)."""

    model: nn.Module
    inner: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    reduction: str
    fisher: str
    mc_samples: int
    fallback: str
    distributed: bool | None
    layers: list[LayerRule]
    diagonal_rules: list[DiagonalRule]
    fallback_params: list[Tensor]
    last_info: dict
    _params: list[Tensor]
    _names: list[str]
    _nonnegative: bool
    _capture: Capture
    _watch: ForwardWatch
    _out_ref: weakref.ref | None
    _forwards: list[_Forward]
    _defer: bool
    _mapping: bool
    _emp_ignored: float
    _loss_watch: bool
    _ce_loss: bool
    _loss_view: LossView | None
    _n_forwards: int
    _step_forwards: int
    _loss_batch: tuple | None
    _pending: FactorStats | None
    _pending_bad: bool
    _warned: set[str]
    _batch: tuple | None
    _rng: RandomState | None
    _rng_next: RandomState | None
    _in_step: bool
    _index: dict[int, int]
    _inv_cache: dict[int, tuple[tuple, KroneckerBlock]]
    _inv_version: int
    _numels: list[int]
    _offsets: list[int]
    _numel: int
    _prev_views: list[Tensor] | None
    _prev_flat: Tensor | None
    _chain: list[tuple[str, Any]] | None
    _conv: bool
    _reverse_jvp: bool
    _fwd: tuple | None
    _masks: dict[int, list[Tensor | None]]  # the last forward's dropout multipliers, per module
    _fwd_masks: dict[int, Tensor | None]  # those of the forward kept in _fwd, by chain position

    def _warn_once(self, kind: str, message: str) -> None:
        """A ``RuntimeWarning``, once per ``kind``, at the user's line (``opt.step``, the loss)."""
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=outside_stacklevel())


class KFACCapture(KFACAttributes):
    """The forward hooks of :class:`second.optim.KFAC` (statistics, captured batch, loss)."""

    def _capturing_now(self) -> bool:
        group = self.param_groups[0]
        return group["step"] % group["factor_update_period"] == 0

    def _pre_hook(self, module, args):
        active = self.inner.training and torch.is_grad_enabled() and not self._in_step
        if active:  # what the forward will draw (dropout), for the step's re-runs of it
            self._rng_next = RandomState(self._params[0].device)
        self._capture.clear()
        # between factor updates a plain MLP still records its activations (_chain_jvp)
        self._capture.active = active and (self._capturing_now() or self._chain is not None)
        self._masks = {}

    def _dropout_hooks(self, module: nn.Dropout) -> list:
        """Hooks that record the masks a dropout of the MLP chain draws, in call order.

        A module used at several places of the chain draws once per place
        (:func:`dropout_mask`).
        """
        state: list[RandomState] = []

        def before(m, args):
            state.clear()
            if self._capture.active:
                state.append(RandomState(args[0].device))

        def after(m, args, output):
            if state and self._capture.active:
                self._masks.setdefault(id(m), []).append(dropout_mask(m, state.pop(), args[0]))

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def _top_hook(self, module, args, kwargs, output):
        if not (self.inner.training and torch.is_grad_enabled()) or self._in_step:
            return
        self._batch = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)
        self._rng = self._rng_next
        self._fwd = None
        self._n_forwards += 1
        self._loss_batch = None
        self._out_ref = weakref.ref(output) if isinstance(output, Tensor) else None
        self._loss_view = None
        entry = _Forward()
        if self._ce_loss and isinstance(output, Tensor) and output.requires_grad:
            entry.out = output
        self._forwards.append(entry)
        if not self._capture.active:
            return
        self._capture.active = False
        if not isinstance(output, Tensor):
            raise TypeError("KFAC needs a model whose forward returns one tensor (the output)")
        self._keep_forward(args, kwargs, output)
        if not self._capturing_now():
            self._capture.clear()
            return
        if nonfinite_rows(output) is not None:  # no statistics from a batch that will be refused
            self._pending_bad = True
            self._capture.clear()
            self._pending = None
            return
        if self._pending_bad:
            self._capture.clear()
            return
        fb = self.fallback_params if self.fallback == "diagonal" else []
        if self.fisher == "empirical":
            # gradients of the user's own loss, captured during their backward; every
            # training forward since the last step adds to them (accumulation)
            stats = self._pending or FactorStats(self.layers, fb, lazy=True)
            if self._loss_watch and entry.out is not None:
                entry.snap = self._capture.snapshot()  # for a loss call that re-does them
            entry.emp = self._empirical_hooks(output, stats)
            self._pending = stats
            return
        # a cross-entropy loss may see a re-arrangement of the output (its classes along
        # another dimension) or ignore targets: its call re-does these statistics
        if self._loss_watch and entry.out is not None:
            entry.snap = self._capture.snapshot()
        if entry.snap is not None and self._defer:  # the loss call did so last time
            entry.deferred = True
            self._capture.clear()
            return
        S = curvature_columns(
            self.loss_fn, output, None, self.reduction, self.fisher, self.mc_samples
        )
        entry.this = FactorStats(self.layers, fb, lazy=True)
        batch_statistics(self.layers, fb, output, S, self._capture, entry.this)
        self._capture.clear()

    def _flush_forwards(self) -> None:
        """Fold the step's forwards' statistics into the step's (accumulation)."""
        entries, self._forwards = self._forwards, []
        for entry in entries:
            if entry.deferred:  # left to a loss call that did not come (the graph is gone)
                self._defer = False
                self._warn_once(
                    "unseen",
                    "KFAC: the loss was not computed with loss_fn from this forward's "
                    "output, so this batch adds no curvature statistics (the next "
                    "batches are gathered in the forward pass again). Warned once.",
                )
            elif entry.this is not None:
                if self._pending is None:
                    self._pending = entry.this
                else:
                    self._pending.merge(entry.this)
            if entry.out is not None and not entry.seen and entry.out.dim() > 2:
                self._warn_once(
                    "dim1",
                    "KFAC: loss_fn was not called on this forward's output (or a view of it) "
                    f"before step(), so its curvature was taken with the classes along dim 1 of "
                    f"the {list(entry.out.shape)} output, as for loss_fn(output, target). "
                    "If the loss was computed another way (F.cross_entropy, another "
                    "CrossEntropyLoss instance, on out.reshape(-1, V)), call the loss_fn "
                    "given to KFAC instead. Warned once.",
                )

    def _take_loss(self, entry: _Forward, view: LossView) -> None:
        """Take the cross-entropy loss as written for the curvature of ``entry``'s forward.

        The loss is cross-entropy on ``out.movedim(dim, 1)`` against ``target`` on the
        output's positions (:func:`~second.optim._views.loss_on_output`: ``out.reshape(-1,
        C)``, a shifted copy and a transpose are the output with its classes along ``dim``;
        ignored targets, and positions the loss does not see, weigh 0). The quadratic model
        takes its curvature the same way (:attr:`_loss_view`), and the forward's statistics
        are re-done (its graph is alive: the loss is computed before ``backward()``), the
        ignored positions left out. A loss on a scaled or shifted output (a temperature, a
        logit bias, an additive mask) has its curvature at its input's values
        (:func:`~second.optim._views.loss_point`) and its columns times ``view.scale`` on
        the way back.
        """
        out = entry.out
        assert out is not None
        dim, target, scale, values = view
        f = out.movedim(dim, 1) if dim != 1 else out
        at = loss_point(f, view)  # where the loss is evaluated
        c = target_weights(self.loss_fn, at, target, self.reduction)
        y = target.detach() if c is not None and target is not None else None
        plain = dim == 1 and c is None and values is None and scale == 1.0
        if entry is self._forwards[-1] and not plain:
            self._loss_view = LossView(dim, y, scale, values)
        snap, entry.out = entry.snap, None
        if snap is None:
            return
        entry.snap = None
        if entry.emp is not None:  # the empirical Fisher: its backward hooks gather them
            if dim == 1 and c is None:
                return  # rows are examples, every target counts: the hooks' statistics hold
            # the hooks would count ignored targets (and the batch size for a mean over the
            # kept ones), or take the output's rows for examples: the loss as written instead
            entry.emp.cancel()
            y = target.detach() if target is not None else None
        if plain and entry.this is not None:
            return  # the forward's statistics are the loss' own
        # the empirical Fisher's fallback diagonal comes from the gradient at the step
        fb = self.fallback_params if self.fallback == "diagonal" and entry.emp is None else []
        S = curvature_columns(self.loss_fn, at, y, self.reduction, self.fisher, self.mc_samples)
        S = S * scale if scale != 1.0 else S  # d loss / d out = scale * d loss / d x
        keep = None if c is None else c > 0
        if entry.emp is not None and keep is not None and self.reduction == "mean":
            # S holds n * dL/df per row (n rows); the empirical Fisher's per-example gradients
            # are m * dL/df over the m rows with a kept target, averaged over those m: the
            # statistics (averaged over n) take sqrt(m / n) S
            n = keep.shape[0]
            m = int(keep.reshape(n, -1).any(1).sum())
            S = S * math.sqrt(m / n)
            self._emp_ignored += n - m
        entry.this = FactorStats(self.layers, fb, lazy=True)
        batch_statistics(self.layers, fb, f, S, snap, entry.this, keep=keep)
        entry.deferred = False
        # once a loss call has re-done them, later forwards leave them to it (a batch without
        # padding after one with it would otherwise be computed twice, in the forward and here)
        self._defer = self._defer or not plain

    def _unmapped(self, x: Tensor, out: Tensor) -> bool:
        """Warn once when the loss sees a function of ``out`` that is not its elements."""
        if not depends_on(x, out):  # a walk of the graph: no backward, no hooks to pause
            return False
        self._warn_once(
            "unmapped",
            "KFAC: the loss module's input is computed from the model's output but is not "
            "the output or a re-arrangement of its elements that KFAC can map (views, "
            "slices, transposes, copies, indexing, times a number or plus a constant, with "
            "the classes along one dim of the output and each position used once; not, for "
            "example, a soft-capped output or one filled by masked_fill), so the curvature "
            "is that of loss_fn on the output itself, its classes along dim 1. Warned once.",
        )
        return True

    def _check_elementwise_input(self, x: Tensor, out: Tensor) -> None:
        """Warn once when an elementwise loss (MSE, BCE) sees part or a function of ``out``.

        Its curvature on all of ``out``'s elements, re-arranged, is the same; on a slice, or on
        a scaled output, it is not, and KFAC takes loss_fn's on the whole output.
        """
        if not (x.requires_grad and out.requires_grad):
            return
        kind = path_kind(x, out)
        if kind == "selection" and x.numel() == out.numel():
            return  # a view or copy of every element
        if kind is None and not depends_on(x, out):
            return  # another tensor
        self._warn_once(
            "elementwise",
            "KFAC: the loss module's input is computed from the model's output but is not "
            "all of its elements (a slice, an index) or not the elements themselves (a scaled "
            "or transformed output): KFAC's statistics and quadratic model take the curvature "
            "of loss_fn on the whole output. Apply loss_fn to the output itself, or compute "
            "what the loss sees inside the model's forward. Warned once.",
        )

    def _on_loss(self, args: tuple, kwargs: dict, output) -> None:
        """Keep the target of ``loss_fn(output, target)`` on the last training forward's output.

        :meth:`_trial_loss` re-evaluates that loss after the step without a backward pass.
        """
        if self._in_step or not torch.is_grad_enabled():
            return
        out = self._out_ref() if self._out_ref is not None else None
        x, target = loss_input(args, kwargs)
        if not self._ce_loss and x is not None and out is not None and x is not out:
            self._check_elementwise_input(x, out)
        if self._ce_loss and x is not None and x.requires_grad:
            for entry in reversed(self._forwards):  # the latest forward this loss comes from
                if entry.out is None:  # its loss call came (or it has no graph)
                    continue
                if x is entry.out or depends_on(x, entry.out):
                    entry.seen = True
                if x is entry.out:
                    match: LossView | None = LossView(1, target)
                else:
                    ignore = getattr(self.loss_fn, "ignore_index", -100)
                    self._mapping = True
                    try:
                        match = (
                            None
                            if target is None
                            else loss_on_output(
                                x,
                                entry.out,
                                target,
                                ignore,
                                self.reduction,
                                label_smoothing(self.loss_fn),
                            )
                        )
                    finally:
                        self._mapping = False
                if match is not None:
                    self._take_loss(entry, match)
                    break
                if self._unmapped(x, entry.out):
                    break
        if out is None or not args or args[0] is not out or self._loss_batch is not None:
            self._loss_batch = None
            return
        if not isinstance(output, Tensor) or torch.is_autocast_enabled(out.device.type):
            return
        rest = tuple(a.detach() if isinstance(a, Tensor) else a for a in args[1:])
        self._loss_batch = (rest, kwargs, weakref.ref(output))

    def _keep_forward(self, args, kwargs, output: Tensor) -> None:
        """Keep the captured activations of a plain MLP forward for :meth:`_chain_jvp`."""
        cap = self._capture
        if (
            self._chain is None
            or kwargs
            or len(args) != 1
            or not isinstance(args[0], Tensor)
            or args[0].dim() != 2
            or any(len(cap.inputs.get(j, ())) != 1 for j in range(len(self.layers)))
        ):
            return
        # the k-th place of a dropout module in the chain took its k-th mask of this forward
        fwd_masks: dict[int, Tensor | None] = {}
        taken: dict[int, int] = {}
        for pos, (kind, m) in enumerate(self._chain):
            if kind == "dropout":
                k = taken[id(m)] = taken.get(id(m), -1) + 1
                drawn = self._masks.get(id(m), [])
                if k >= len(drawn):
                    return
                fwd_masks[pos] = drawn[k]
        if any(len(self._masks.get(m, ())) != n + 1 for m, n in taken.items()):
            return
        self._fwd_masks = fwd_masks
        dt = self.layers[0].weight.dtype  # an autocast forward's activations: in float32
        self._fwd = (
            args[0].detach().to(dt),
            [cap.inputs[j][0].to(dt) for j in range(len(self.layers))],
            [cap.outputs[j][0].detach().to(dt) for j in range(len(self.layers))],
            output.detach().to(dt),
        )

    def _empirical_hooks(self, output: Tensor, stats: FactorStats) -> _Empirical:
        n = output.shape[0]
        scale = float(n) if self.reduction == "mean" else 1.0
        stats.n += n
        layers = self.layers
        token = _Empirical(stats, n)

        def add(j: int, inp: Tensor, g: Tensor) -> None:
            # not the backward pass of a loss call's index map, which reaches the output
            if token.active and not self._mapping:
                add_layer_statistics(stats, j, layers[j], inp, (g * scale).unsqueeze(0))

        self._capture.on_output_grads(add)
        return token

    def _empirical_diagonal(self, stats: FactorStats, ignored: float = 0.0) -> None:
        """Fallback diagonal for the empirical Fisher: the squared summed gradient.

        Per-example gradients of those parameters are not available from the user's
        backward; ``(sum_i g_i)^2`` equals ``sum_i g_i^2`` up to cross terms. ``ignored``:
        the examples among ``stats.n`` whose targets were all ignored (a mean loss averaged
        over the others).
        """
        kept = stats.n - ignored
        scale = math.sqrt(stats.n * kept) if self.reduction == "mean" else 1.0
        for i, p in enumerate(stats.fallback_params):
            if p.grad is not None:
                stats.diag[i] = (p.grad * scale) ** 2
