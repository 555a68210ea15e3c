"""The hooks of the kfac package: the only place that registers hooks on a model.

:class:`Capture` records every call of the KFAC layers during a forward pass (input
detached, output with its graph), so that curvature columns can be backpropagated to the
layer outputs afterwards, or the user's own gradients caught there
(:meth:`Capture.on_output_grads`). A module called twice (weight tying, a shared block)
appears twice, and its statistics add up. :func:`watch_forward` calls an owner's methods
before and after the model's own forward, through weak references.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .rules import LayerRule

__all__ = ["Capture", "watch_forward", "ForwardWatch"]


class Capture:
    """Forward hooks storing every call's input and output of the given layers.

    Use as a context manager (the hooks are removed on exit) or call :meth:`close`.
    Nothing is stored while ``active`` is false or gradients are disabled.

    Attributes:
        inputs, outputs: ``{layer index: [tensor per call]}``.
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

    def __init__(self, layers: Sequence[LayerRule]):
        self.layers = list(layers)
        self.inputs: dict[int, list[Tensor]] = {}
        self.outputs: dict[int, list[Tensor]] = {}
        self.handles: list = []
        self.active = True

    def __enter__(self) -> Capture:
        for j, layer in enumerate(self.layers):
            self.handles.append(layer.module.register_forward_hook(self._hook(j)))
        return self

    def _hook(self, j: int):
        def hook(module, args, output):
            if (
                not self.active
                or not torch.is_grad_enabled()
                or module is not self.layers[j].module
            ):
                return
            self.inputs.setdefault(j, []).append(args[0].detach())
            self.outputs.setdefault(j, []).append(output)

        return hook

    def calls(self) -> list[tuple[int, Tensor, Tensor]]:
        """``(layer index, input, output)`` of every recorded call, layer by layer."""
        return [
            (j, inp, out)
            for j in range(len(self.layers))
            for inp, out in zip(self.inputs.get(j, []), self.outputs.get(j, []))
        ]

    def on_output_grads(self, fn: Callable[[int, Tensor, Tensor], None]) -> None:
        """Call ``fn(layer index, input, gradient at the output)`` in the coming backward.

        Registers a tensor hook on every recorded output, then forgets the calls.
        """
        for j, inp, out in self.calls():

            def hook(g, j=j, inp=inp):
                fn(j, inp, g)

            out.register_hook(hook)
        self.clear()

    def clear(self) -> None:
        """Forget the recorded calls (the hooks stay)."""
        self.inputs.clear()
        self.outputs.clear()

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

    post = module.register_forward_hook(post_hook, with_kwargs=True)
    pre = module.register_forward_pre_hook(pre_hook)
    return ForwardWatch([post, pre])
