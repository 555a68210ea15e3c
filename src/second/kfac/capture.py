"""The hooks of the kfac package: the only place that registers hooks on a model.

:class:`Capture` records every call of the KFAC layers during a forward pass (input
detached, output with its graph), so that curvature columns can be backpropagated to the
layer outputs afterwards, or the user's own gradients caught there
(:meth:`Capture.on_output_grads`). A module called twice (weight tying, a shared block)
appears twice, and its statistics add up. :func:`watch_forward` calls an owner's methods
before and after the model's own forward, through weak references.

Layers that apply their weights inside a functional forward (``nn.MultiheadAttention``
hands ``in_proj_weight`` and ``out_proj.weight`` to ``F.multi_head_attention_forward``)
are captured from the ``F.linear`` calls made while the module runs: for that time
``torch.nn.functional.linear`` is wrapped (reference-counted over threads, restored when
the last such module returns, also when it raises); calls of other weights pass through.
The projection's output is split into the blocks' column ranges and joined again, so
each block has its own tensor in the graph (same values, one extra copy).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._compile import eager_under_compile
from .columns import backprop_columns
from .rules import AttentionProjectionRule, DiagonalRule, LayerRule

__all__ = ["Capture", "watch_forward", "ForwardWatch"]

_LINEAR = F.linear  # the original, restored when no capture is recording
_LOCK = threading.Lock()
_USERS = [0]
_TLS = threading.local()


def _recording_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = _LINEAR(input, weight, bias)
    for record in getattr(_TLS, "stack", ()):  # every capture recording in this thread
        out = record(input, weight, out)
    return out


def _push(recorder: Callable) -> None:
    if not hasattr(_TLS, "stack"):
        _TLS.stack = []
    _TLS.stack.append(recorder)
    with _LOCK:
        _USERS[0] += 1
        F.linear = _recording_linear  # type: ignore[assignment]


def _pop() -> None:
    _TLS.stack.pop()
    with _LOCK:
        _USERS[0] -= 1
        if _USERS[0] == 0:
            F.linear = _LINEAR  # type: ignore[assignment]


def _row_span(w: Tensor, base: Tensor) -> tuple[int, int] | None:
    """The rows ``[start, stop)`` of ``base`` that ``w`` is (itself or a row slice), or ``None``."""
    if w is base:
        return 0, base.shape[0]
    if w._base is not base or w.dim() != base.dim() or w.stride() != base.stride():
        return None
    start, rem = divmod(int(w.storage_offset() - base.storage_offset()), int(base.stride(0)))
    return (start, start + w.shape[0]) if rem == 0 else None


class Capture:
    """Forward hooks storing every call's input and output of the given layers.

    Use as a context manager (the hooks are removed on exit) or call :meth:`close`.
    Nothing is stored while ``active`` is false or gradients are disabled.

    Args:
        layers: the Kronecker-factored layer rules.
        diagonal: the exact-diagonal rules (normalization layers), recorded in
            ``diag_inputs``/``diag_outputs``.

    Attributes:
        inputs, outputs: ``{layer index: [tensor per call]}``.
        diag_inputs, diag_outputs: the same for ``diagonal``.
        active: whether calls are recorded (default ``True``).

    Example:
        >>> from second.kfac import find_layers
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> with Capture(find_layers(net)) as cap:
        ...     _ = net(torch.randn(5, 3))
        >>> first, second = cap.inputs[0], cap.inputs[1]  # each layer's calls
        >>> tuple(first[0].shape), tuple(second[0].shape)
        ((5, 3), (5, 4))
    """

    def __init__(self, layers: Sequence[LayerRule], diagonal: Sequence[DiagonalRule] = ()):
        self.layers = list(layers)
        self.diagonal = list(diagonal)
        self.inputs: dict[int, list[Tensor]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        self.diag_inputs: dict[int, list[Tensor]] = {}
        self.diag_outputs: dict[int, list[Tensor]] = {}
        self.handles: list = []
        self.active = True

    def __enter__(self) -> Capture:
        functional: dict[int, tuple[nn.Module, list[int]]] = {}
        for j, layer in enumerate(self.layers):
            if layer.functional:
                functional.setdefault(id(layer.module), (layer.module, []))[1].append(j)
                continue
            for module in layer.modules:
                hook = self._hook(module, j, self.inputs, self.outputs)
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        for i, rule in enumerate(self.diagonal):
            for module in rule.modules:
                hook = self._hook(module, i, self.diag_inputs, self.diag_outputs)
                self.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        for module, js in functional.values():
            self._functional_hooks(module, js)
        return self

    def _recording(self) -> bool:
        return self.active and torch.is_grad_enabled()

    def _hook(self, target: nn.Module, j: int, inputs: dict, outputs: dict):
        def hook(module, args, kwargs, output):
            if not self._recording() or module is not target:
                return
            # the input: the first positional argument, or the first tensor passed by name
            inp = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            inputs.setdefault(j, []).append(inp.detach())
            outputs.setdefault(j, []).append(output)

        return _eager(hook)

    def _functional_hooks(self, target: nn.Module, js: list[int]) -> None:
        """Record the ``F.linear`` calls of ``target``'s own weights while it runs."""
        pushed: list[bool] = []

        def before(module, args):
            on = self._recording() and module is target
            pushed.append(on)
            if on:
                _push(self._recorder(js))

        def after(module, args, output):
            if pushed and pushed.pop():
                _pop()

        self.handles.append(target.register_forward_pre_hook(_eager(before)))
        self.handles.append(target.register_forward_hook(_eager(after), always_call=True))

    def _recorder(self, js: list[int]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """One module call's ``F.linear`` recorder: inputs ``[N, T, d]``, outputs split by block."""
        shape: list[int] = []  # the query's (T, N), for the flattened out_proj input

        def record(x: Tensor, w: Tensor, out: Tensor) -> Tensor:
            hits = []
            for j in js:
                layer = self.layers[j]
                span = _row_span(w, layer.weight)
                own = layer.span() if isinstance(layer, AttentionProjectionRule) else None
                if span is None or own is None or not span[0] <= own[0] < own[1] <= span[1]:
                    continue
                hits.append((own[0] - span[0], own[1] - span[0], j))
            if not hits:
                return out
            if x.dim() == 3:
                if not shape:
                    shape.extend(x.shape[:2])
                xs, full = x, out
            elif x.dim() == 2 and shape:  # [T*N, d] -> [T, N, d]
                xs, full = x.view(*shape, -1), out.view(*shape, -1)
            else:
                return out
            hits.sort()
            bounds = sorted({0, full.shape[-1], *(b for h in hits for b in h[:2])})
            pieces = list(full.split([b - a for a, b in zip(bounds[:-1], bounds[1:])], dim=-1))
            at = {a: k for k, a in enumerate(bounds[:-1])}
            inp = xs.detach().transpose(0, 1)  # batch-first rows for every block
            for c0, c1, j in hits:
                piece = pieces[at[c0]]
                if piece.shape[-1] != c1 - c0:  # (not reached with the attention's calls)
                    continue
                self.inputs.setdefault(j, []).append(inp)
                self.outputs.setdefault(j, []).append(piece)
            joined = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
            return joined.reshape(out.shape)

        return record

    def calls(self) -> list[tuple[int, Tensor, Tensor]]:
        """``(layer index, input, output)`` of every recorded call, layer by layer."""
        return [
            (j, inp, out)
            for j in range(len(self.layers))
            for inp, out in zip(self.inputs.get(j, []), self.outputs.get(j, []))
        ]

    def diagonal_calls(self) -> list[tuple[int, Tensor, Tensor]]:
        """``(diagonal rule index, input, output)`` of every recorded call."""
        return [
            (i, inp, out)
            for i in range(len(self.diagonal))
            for inp, out in zip(self.diag_inputs.get(i, []), self.diag_outputs.get(i, []))
        ]

    def backprop(
        self, f: Tensor, S: Tensor, *, retain_graph: bool = True, diagonal: bool = False
    ) -> tuple[list[tuple[int, Tensor, Tensor]], list[tuple[int, Tensor, Tensor]]]:
        """Columns ``S [K, *f.shape]`` backpropagated from ``f`` to every recorded output.

        Args:
            f: the model output the calls led to.
            S: the columns (:func:`~second.kfac.curvature_columns`).
            retain_graph: keep the graph for another backward.
            diagonal: also the exact-diagonal rules' calls.

        Returns:
            ``(layer calls, diagonal calls)``, each ``[(index, input, g [K, *output.shape])]``
            in the order of :meth:`calls` / :meth:`diagonal_calls`.
        """
        calls, dcalls, _ = self.backprop_with(
            f, S, [], retain_graph=retain_graph, diagonal=diagonal
        )
        return calls, dcalls

    def backprop_with(
        self,
        f: Tensor,
        S: Tensor,
        extra: Sequence[Tensor],
        *,
        retain_graph: bool = True,
        diagonal: bool = False,
    ) -> tuple[list[tuple[int, Tensor, Tensor]], list[tuple[int, Tensor, Tensor]], list[Tensor]]:
        """:meth:`backprop`, and in the same backward the gradients of ``extra`` tensors.

        Returns:
            ``(layer calls, diagonal calls, [g [K, *t.shape] for t in extra])``.
        """
        calls = self.calls() + (self.diagonal_calls() if diagonal else [])
        gs = backprop_columns(f, S, [o for *_, o in calls] + list(extra), retain_graph=retain_graph)
        n, m = len(self.calls()), len(calls)
        out = [(j, inp, g) for (j, inp, _), g in zip(calls, gs[:m])]
        return out[:n], out[n:m], gs[m:]

    def on_output_grads(self, fn: Callable[[int, Tensor, Tensor], None]) -> None:
        """Call ``fn(layer index, input, gradient at the output)`` in the coming backward.

        Registers a tensor hook on every recorded output, then forgets the calls.
        """
        for j, inp, out in self.calls():

            def hook(g, j=j, inp=inp):
                fn(j, inp, g)

            out.register_hook(hook)
        self.clear()

    def snapshot(self) -> Capture:
        """The recorded calls, without hooks (the lists copied, the tensors shared)."""
        snap = Capture(self.layers, self.diagonal)
        snap.active = False
        snap.inputs = {j: list(v) for j, v in self.inputs.items()}
        snap.outputs = {j: list(v) for j, v in self.outputs.items()}
        snap.diag_inputs = {j: list(v) for j, v in self.diag_inputs.items()}
        snap.diag_outputs = {j: list(v) for j, v in self.diag_outputs.items()}
        return snap

    def clear(self) -> None:
        """Forget the recorded calls (the hooks stay)."""
        for d in (self.inputs, self.outputs, self.diag_inputs, self.diag_outputs):
            d.clear()

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def __exit__(self, *exc) -> None:
        self.close()


class ForwardWatch:
    """Handles of the hooks :func:`watch_forward` installed; :meth:`remove` removes them.

    Example:
        >>> class Owner:
        ...     def before(self, module, args): pass
        ...     def after(self, module, args, kwargs, output): pass
        >>> net, owner = torch.nn.Linear(2, 1), Owner()
        >>> w = watch_forward(net, owner.before, owner.after)
        >>> w.remove(); len(net._forward_hooks), len(net._forward_pre_hooks)
        (0, 0)
    """

    def __init__(self, handles: list):
        self.handles = handles

    def remove(self) -> None:
        """Remove both hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []


def _eager(hook: Callable) -> Callable:
    """``hook`` run eagerly under ``torch.compile``: the compiler breaks its graph there.

    The hooks keep tensors and run backward passes; traced, they would see fake tensors.
    In eager mode the wrapper costs a few microseconds a call.
    """
    return eager_under_compile(hook, recursive=True)


def watch_forward(
    module: nn.Module,
    before: Callable[[nn.Module, tuple], None],
    after: Callable[[nn.Module, tuple, dict, object], None],
) -> ForwardWatch:
    """Call ``before(module, args)`` and ``after(module, args, kwargs, output)`` around forward.

    ``before`` and ``after`` are bound methods held by weak reference, so the hooks do
    not keep their owner alive; and they fire for ``module`` itself only, so a deep copy
    of the model (which copies its hooks) is ignored.

    Returns:
        A :class:`ForwardWatch` whose ``remove()`` removes the hooks.

    Example:
        >>> class Counter:
        ...     n = 0
        ...     def before(self, module, args): self.n += 1
        ...     def after(self, module, args, kwargs, output): pass
        >>> net, c = torch.nn.Linear(2, 1), Counter()
        >>> w = watch_forward(net, c.before, c.after)
        >>> _ = net(torch.ones(1, 2)); w.remove(); _ = net(torch.ones(1, 2))
        >>> c.n
        1
    """
    target = weakref.ref(module)
    pre_ref, post_ref = weakref.WeakMethod(before), weakref.WeakMethod(after)

    def pre_hook(mod, args):
        fn = pre_ref()
        if fn is not None and mod is target():
            fn(mod, args)

    def post_hook(mod, args, kwargs, output):
        fn = post_ref()
        if fn is not None and mod is target():
            fn(mod, args, kwargs, output)

    post = module.register_forward_hook(_eager(post_hook), with_kwargs=True)
    pre = module.register_forward_pre_hook(_eager(pre_hook))
    return ForwardWatch([post, pre])
