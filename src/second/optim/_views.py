"""What a loss module saw of the model's output: the output, or a re-arrangement of it.

Language-model code computes the loss on ``logits.reshape(-1, V)``, on a shifted copy
``logits[:, :-1].contiguous().view(-1, V)`` or on ``logits.transpose(1, 2)``: a tensor whose
elements are those of the output (or some of them), re-arranged by views, slices and copies.
:func:`selection` finds that re-arrangement as an index map from the autograd graph between
the two, while it is alive (the loss is computed before ``backward()``), so the optimizers can
take the curvature of the loss as written (its classes along its own dim 1, its targets).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["depends_on", "selection", "kept_positions", "loss_input", "watch_loss"]


def loss_input(args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None]:
    """``(input, target)`` of a loss module's call, positional or by name."""
    x = args[0] if args else kwargs.get("input")
    y = args[1] if len(args) > 1 else kwargs.get("target")
    return (x if isinstance(x, Tensor) else None), (y if isinstance(y, Tensor) else None)


def depends_on(x: Tensor, out: Tensor) -> bool:
    """Whether ``x`` was computed from ``out`` (a backward over the graph between them only)."""
    if not (x.requires_grad and out.requires_grad) or x is out:
        return x is out
    (g,) = torch.autograd.grad(
        x, out, grad_outputs=torch.zeros_like(x), retain_graph=True, allow_unused=True
    )
    return g is not None


def selection(x: Tensor, out: Tensor) -> Tensor | None:
    r"""The index map of ``x``'s elements into ``out``'s, when ``x`` only re-arranges them.

    Returns ``sel`` shaped like ``x`` with ``x = out.reshape(-1)[sel]`` (flat indices in
    ``out``'s row-major order), or ``None`` when ``x`` does not come from ``out`` or is not a
    selection of its elements (a sum, a scaling, ...). ``x`` is a linear function
    :math:`x = M\,\mathrm{out}` of ``out`` with a 0/1 matrix :math:`M` that has one 1 per row;
    :math:`M t` is found by differentiating :math:`M^\top u` (one backward with its graph) with
    respect to :math:`u`, and the indices go through it in digits small enough for the dtype
    to carry exactly. Costs a few backward passes over the graph between ``out`` and ``x``.
    """
    if x is out or not (x.requires_grad and out.requires_grad):
        return None
    if not (x.is_floating_point() and out.is_floating_point()):
        return None
    u = torch.zeros_like(x, requires_grad=True)
    with torch.enable_grad():
        (gu,) = torch.autograd.grad(x, out, grad_outputs=u, create_graph=True, allow_unused=True)
    if gu is None or not gu.requires_grad:
        return None

    def apply(t: Tensor) -> Tensor | None:
        (r,) = torch.autograd.grad(gu, u, grad_outputs=t, retain_graph=True, allow_unused=True)
        return r

    ones = apply(torch.ones_like(out))
    if ones is None or not bool((ones == 1).all()):
        return None
    n = out.numel()
    base = 2 ** min(int(-math.log2(torch.finfo(out.dtype).eps)), 24)  # exact integers
    flat = torch.arange(n, device=out.device)
    sel = torch.zeros(x.shape, dtype=torch.long, device=out.device)
    scale = 1
    while True:
        digit = ((flat // scale) % base).to(out.dtype).reshape(out.shape)
        part = apply(digit)
        if part is None:
            return None
        sel += part.round().long() * scale
        scale *= base
        if scale >= n:
            return sel


def kept_positions(kept: Tensor, sel: Tensor | None, out_shape: tuple) -> Tensor | None:
    """The output's positions (its dims but its classes') whose loss terms count.

    ``kept``: per position of the loss input (cross-entropy: its dims but dim 1, the
    classes); ``sel``: :func:`selection` (``None``: the input is the output itself). The
    output's class dimension is where a step along the input's classes moves; positions of
    the output the loss does not see count as not kept. ``None`` when it cannot be told.
    """
    if sel is None:
        return kept
    if sel.dim() < 2 or sel.shape[1] < 2:
        return None
    strides = [math.prod(out_shape[d + 1 :]) for d in range(len(out_shape))]

    def coords(flat: Tensor) -> list[Tensor]:
        return [(flat // s) % n for s, n in zip(strides, out_shape)]

    first, second = coords(sel.select(1, 0)), coords(sel.select(1, 1))
    moved = [d for d in range(len(out_shape)) if bool((first[d] != second[d]).any())]
    if len(moved) != 1:
        return None
    cd = moved[0]
    pos_shape = tuple(n for d, n in enumerate(out_shape) if d != cd)
    keep = torch.zeros(pos_shape, dtype=torch.bool, device=kept.device)
    index = tuple(c.reshape(-1) for d, c in enumerate(first) if d != cd)
    keep[index] = kept.reshape(-1)
    return keep


def watch_loss(loss_fn: Any, method: Callable[[tuple, dict, Any], None]) -> Any:
    """Call the bound ``method(args, kwargs, output)`` after every call of the loss module.

    A weak reference to ``method``'s owner (a deep copy of the loss keeps a hook that points
    nowhere, and the owner can be collected). Returns the hook's handle, or ``None`` for a
    loss that is not an ``nn.Module`` (a function cannot be watched).
    """
    if not isinstance(loss_fn, nn.Module):
        return None
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def hook(mod, args, kwargs, output):
        fn = ref()
        if fn is not None:
            fn(args, kwargs, output)

    return loss_fn.register_forward_hook(hook, with_kwargs=True)
