"""The KFAC optimizer's attributes, and the hooks that gather its curvature statistics.

:class:`KFACAttributes` declares what :class:`second.optim.KFAC`'s constructor sets and its
helpers read; :class:`KFACCapture` holds the forward hooks (the batch statistics, the
captured batch and activations of the quadratic model, the loss of the damping adaptation).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._losses import target_weights
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
from ._views import DataKey, data_key, same_data


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
    _out_key: DataKey | None
    _last: tuple[FactorStats | None, Capture | None] | None
    _defer: bool
    _loss_watch: bool
    _ce_loss: bool
    _loss_view: tuple | None
    _n_forwards: int
    _step_forwards: int
    _loss_batch: tuple | None
    _pending: FactorStats | None
    _pending_bad: bool
    _warned: set[str]
    _batch: tuple | None
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


class KFACCapture(KFACAttributes):
    """The forward hooks of :class:`second.optim.KFAC` (statistics, captured batch, loss)."""

    def _capturing_now(self) -> bool:
        group = self.param_groups[0]
        return group["step"] % group["factor_update_period"] == 0

    def _pre_hook(self, module, args):
        active = self.inner.training and torch.is_grad_enabled() and not self._in_step
        self._capture.clear()
        # between factor updates a plain MLP still records its activations (_chain_jvp)
        self._capture.active = active and (self._capturing_now() or self._chain is not None)

    def _top_hook(self, module, args, kwargs, output):
        if not (self.inner.training and torch.is_grad_enabled()) or self._in_step:
            return
        self._batch = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kwargs)
        self._fwd = None
        self._n_forwards += 1
        self._loss_batch = None
        self._out_ref = weakref.ref(output) if isinstance(output, Tensor) else None
        self._out_key = data_key(output) if isinstance(output, Tensor) else None
        self._loss_view = None
        self._flush_forward()  # the previous forward's (micro-batch's) statistics
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
            self._empirical_hooks(output, stats)
            self._pending = stats
            return
        # a cross-entropy loss module may see a view of the output (its classes along
        # another dimension) or ignored targets: its call re-does these statistics
        snap = self._capture.snapshot() if self._loss_watch else None
        if snap is not None and self._defer:  # the loss call did so last time: leave it to it
            self._last = (None, snap)
            self._capture.clear()
            return
        S = curvature_columns(
            self.loss_fn, output, None, self.reduction, self.fisher, self.mc_samples
        )
        this = FactorStats(self.layers, fb, lazy=True)
        batch_statistics(self.layers, fb, output, S, self._capture, this)
        self._capture.clear()
        self._last = (this, snap)

    def _kept_positions(self, kept: Tensor, x: Tensor, view: bool) -> Tensor | None:
        """The positions of the output whose targets count, from those of the loss input ``x``.

        ``kept``: per position of ``x`` (cross-entropy: all dimensions but the classes, dim
        1). Without a view these are the output's. For a view of a contiguous output its
        elements are mapped back by their offsets and a position of the output (all its
        dimensions but the last, e.g. ``[B, T]`` of ``[B, T, V]`` logits) counts when any
        of its elements does; ``None`` (every position counts) for other outputs.
        """
        key = self._out_key
        if not view:
            return kept
        if key is None or not key[5]:
            return None
        cls = kept.unsqueeze(1).expand(x.shape) if x.dim() > 1 else kept
        numel, offset = key[1], key[4]
        where = torch.arange(offset + numel, device=x.device).as_strided(
            x.shape, x.stride(), x.storage_offset()
        )
        flat = torch.zeros(numel, dtype=torch.bool, device=x.device)
        flat[(where - offset).reshape(-1)] = cls.reshape(-1)
        return flat.reshape(key[3]).any(-1)

    def _flush_forward(self) -> None:
        """Fold the last training forward's statistics into the step's (accumulation)."""
        last, self._last = self._last, None
        if last is None:
            return
        this = last[0]
        if this is None:  # left to a loss call that did not come (the graph is gone now)
            self._defer = False
            if "unseen" not in self._warned:
                self._warned.add("unseen")
                warnings.warn(
                    "KFAC: the loss was not computed with loss_fn on this forward's output, "
                    "so this batch adds no curvature statistics (the next batches are "
                    "gathered in the forward pass again). Warned once.",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return
        if self._pending is None:
            self._pending = this
        else:
            self._pending.merge(this)

    def _redo_statistics(self, x: Tensor, target: Tensor | None) -> None:
        """Take the cross-entropy loss' own input ``x`` and targets for the curvature.

        Needed when ``x`` is a view of the output with another shape (``out.reshape(-1, C)``:
        the classes along another dimension than the output's dim 1) or when the targets
        weigh the positions (ignored ones: ``ignore_index``): the quadratic model takes its
        curvature the same way (:attr:`_loss_view`), and the last forward's statistics are
        re-done on ``x`` (while the graph is alive: the loss is computed before backward).
        """
        key = self._out_key
        view = key is not None and tuple(x.shape) != key[3]
        c = target_weights(self.loss_fn, x, target, self.reduction)
        y = target if c is not None else None
        if view or c is not None:
            self._loss_view = (
                (tuple(x.shape), x.stride(), x.storage_offset()) if view else None,
                y.detach() if y is not None else None,
            )
        this, snap = self._last if self._last is not None else (None, None)
        if snap is None:
            return
        if not view and c is None and this is not None:  # the forward's are the loss' own
            self._last, self._defer = (this, None), False
            return
        fb = self.fallback_params if self.fallback == "diagonal" else []
        S = curvature_columns(self.loss_fn, x, y, self.reduction, self.fisher, self.mc_samples)
        keep = None if c is None else self._kept_positions(c > 0, x, view)
        redone = FactorStats(self.layers, fb, lazy=True)
        batch_statistics(self.layers, fb, x, S, snap, redone, keep=keep)
        self._last, self._defer = (redone, None), bool(view or c is not None)

    def _on_loss(self, args: tuple, kwargs: dict, output) -> None:
        """Keep the target of ``loss_fn(output, target)`` on the last training forward's output.

        :meth:`_trial_loss` re-evaluates that loss after the step without a backward pass.
        """
        if self._in_step or not torch.is_grad_enabled():
            return
        out = self._out_ref() if self._out_ref is not None else None
        if self._ce_loss and args and isinstance(args[0], Tensor):
            if same_data(args[0], self._out_key):  # the output, or a view of it
                target = args[1] if len(args) > 1 else kwargs.get("target")
                self._redo_statistics(args[0], target if isinstance(target, Tensor) else None)
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
        dt = self.layers[0].weight.dtype  # an autocast forward's activations: in float32
        self._fwd = (
            args[0].detach().to(dt),
            [cap.inputs[j][0].to(dt) for j in range(len(self.layers))],
            [cap.outputs[j][0].detach().to(dt) for j in range(len(self.layers))],
            output.detach().to(dt),
        )

    def _empirical_hooks(self, output: Tensor, stats: FactorStats) -> None:
        n = output.shape[0]
        scale = float(n) if self.reduction == "mean" else 1.0
        stats.n += n
        layers = self.layers

        def add(j: int, inp: Tensor, g: Tensor) -> None:
            add_layer_statistics(stats, j, layers[j], inp, (g * scale).unsqueeze(0))

        self._capture.on_output_grads(add)

    def _empirical_diagonal(self, stats: FactorStats) -> None:
        """Fallback diagonal for the empirical Fisher: the squared summed gradient.

        Per-example gradients of those parameters are not available from the user's
        backward; ``(sum_i g_i)^2`` equals ``sum_i g_i^2`` up to cross terms.
        """
        scale = stats.n if self.reduction == "mean" else 1.0
        for i, p in enumerate(stats.fallback_params):
            if p.grad is not None:
                stats.diag[i] = (p.grad * scale) ** 2
