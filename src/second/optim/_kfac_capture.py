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


def _data_key(t: Tensor) -> tuple[weakref.ref, int, int]:
    """What identifies ``t``'s elements in any view of them: its base, size and address."""
    return weakref.ref(t._base if t._base is not None else t), t.numel(), t.data_ptr()


def _same_data(a: Tensor, key: tuple[weakref.ref, int, int] | None) -> bool:
    """Whether ``a`` holds the elements :func:`_data_key` identified (``out.reshape(-1, C)``).

    Also when ``out`` itself is gone: a view keeps its base alive.
    """
    if key is None:
        return False
    base = a._base if a._base is not None else a
    return base is key[0]() and a.numel() == key[1] and a.data_ptr() == key[2]


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
    _out_key: tuple[weakref.ref, int, int] | None
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
        self._out_key = _data_key(output) if isinstance(output, Tensor) else None
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
        # every training forward since the last step adds to the statistics (accumulation)
        stats = self._pending or FactorStats(self.layers, fb, lazy=True)
        if self.fisher == "empirical":
            # gradients of the user's own loss, captured during their backward
            self._empirical_hooks(output, stats)
        else:
            S = curvature_columns(
                self.loss_fn, output, None, self.reduction, self.fisher, self.mc_samples
            )
            batch_statistics(self.layers, fb, output, S, self._capture, stats)
            self._capture.clear()
        self._pending = stats

    def _on_loss(self, args: tuple, kwargs: dict, output) -> None:
        """Keep the target of ``loss_fn(output, target)`` on the last training forward's output.

        :meth:`_trial_loss` re-evaluates that loss after the step without a backward pass.
        """
        if self._in_step or not torch.is_grad_enabled():
            return
        out = self._out_ref() if self._out_ref is not None else None
        if args and isinstance(args[0], Tensor) and _same_data(args[0], self._out_key):
            self._note_ignored_targets(args, kwargs)  # the output, or a reshaped view of it
        if out is None or not args or args[0] is not out or self._loss_batch is not None:
            self._loss_batch = None
            return
        if not isinstance(output, Tensor) or torch.is_autocast_enabled(out.device.type):
            return
        rest = tuple(a.detach() if isinstance(a, Tensor) else a for a in args[1:])
        self._loss_batch = (rest, kwargs, weakref.ref(output))

    def _note_ignored_targets(self, args: tuple, kwargs: dict) -> None:
        """Warn once when a cross-entropy target has ignored positions (``ignore_index``).

        The Monte-Carlo and type-2 statistics are gathered in the forward pass, before the
        loss sees its targets, so they count those positions (padding) as well; the
        empirical Fisher's gradients do not.
        """
        if "ignored" in self._warned or self.fisher == "empirical":
            return
        if not isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if not isinstance(target, Tensor) or target.is_floating_point():
            return
        ignored = int((target == self.loss_fn.ignore_index).sum())
        if ignored:
            self._warned.add("ignored")
            warnings.warn(
                f"KFAC's curvature statistics include the {ignored} of {target.numel()} "
                f"positions whose targets are ignored (ignore_index="
                f"{self.loss_fn.ignore_index}): the optimizer gathers them in the forward "
                "pass, before the targets are seen, so its factors count padding as data "
                "(KFACOperator and the other curvature operators leave ignored targets out; "
                "fisher='empirical' does too). Warned once.",
                RuntimeWarning,
                stacklevel=7,  # the user's loss_fn(...) call (through torch's hook dispatch)
            )

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
