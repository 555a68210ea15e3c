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
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "depends_on",
    "selection",
    "graph_signature",
    "loss_on_output",
    "loss_input",
    "watch_loss",
]


def loss_input(args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None]:
    """``(input, target)`` of a loss module's call, positional or by name."""
    x = args[0] if args else kwargs.get("input")
    y = args[1] if len(args) > 1 else kwargs.get("target")
    return (x if isinstance(x, Tensor) else None), (y if isinstance(y, Tensor) else None)


def depends_on(x: Tensor, out: Tensor) -> bool:
    """Whether ``x`` was computed from ``out``: a walk of ``x``'s autograd graph.

    No backward pass (no allocation the size of the output, no tensor hooks fired). An edge
    is a node and which of its outputs it is, so two chunks of one split are told apart.
    """
    if not (x.requires_grad and out.requires_grad) or x is out:
        return x is out
    if x.grad_fn is None:
        return False
    leaf = out.grad_fn is None
    goal = (out.grad_fn, out.output_nr)
    seen: set = set()
    stack = [x.grad_fn]
    if (x.grad_fn, x.output_nr) == goal:
        return True
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for fn, nr in node.next_functions:
            if fn is None:
                continue
            if leaf:
                if getattr(fn, "variable", None) is out:
                    return True
            elif fn is goal[0] and nr == goal[1]:
                return True
            stack.append(fn)
    return False


# torch.OutOfMemoryError from torch 2.5; the CUDA one before (a RuntimeError too)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def selection(x: Tensor, out: Tensor) -> Tensor | None:
    r"""The index map of ``x``'s elements into ``out``'s, when ``x`` only re-arranges them.

    Returns ``sel`` shaped like ``x`` with ``x = out.reshape(-1)[sel]`` (flat indices in
    ``out``'s row-major order), or ``None`` when ``x`` does not come from ``out`` or is not a
    selection of its elements (a sum, a scaling, ...), or when the graph between them cannot
    be differentiated twice (``torch.compile``'s, or one already freed). ``x`` is a linear
    function :math:`x = M\,\mathrm{out}` of ``out`` with a 0/1 matrix :math:`M` that has one
    1 per row; :math:`M t` is found by differentiating :math:`M^\top u` (one backward with its
    graph) with respect to :math:`u`, and the indices go through it in digits small enough
    for the dtype to carry exactly. Costs a few backward passes over the graph between
    ``out`` and ``x``.
    """
    try:
        return _search(x, out)
    except _OUT_OF_MEMORY:
        raise
    except RuntimeError:  # no double backward through the graph: not a map we can find
        return None


def _search(x: Tensor, out: Tensor) -> Tensor | None:
    """See :func:`selection` (which turns its autograd errors into ``None``)."""
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
    bits = min(int(-math.log2(torch.finfo(t.dtype).eps)) for t in (out, x))
    base = 2 ** min(bits, 24)  # integers both dtypes carry exactly
    flat = torch.arange(n, device=out.device)
    sel = torch.zeros(x.shape, dtype=torch.long, device=out.device)
    scale = 1
    while True:
        digit = ((flat // scale) % base).to(out.dtype).reshape(out.shape)
        part = apply(digit)
        if part is None or not bool((part == part.round()).all()):
            return None  # a weighted average, not a selection
        sel += part.round().long() * scale
        scale *= base
        if scale >= n:
            break
    if int(sel.min()) < 0 or int(sel.max()) >= n:
        return None
    # a fixed probe from a generator of its own: the user's random stream stays untouched
    probe_gen = torch.Generator(device=out.device).manual_seed(0)
    probe = torch.rand(out.shape, dtype=out.dtype, device=out.device, generator=probe_gen)
    moved = apply(probe)
    if moved is None or not torch.equal(moved, probe.reshape(-1)[sel].to(moved.dtype)):
        return None
    return sel


# re-arrangements found, by the graph between the loss input and the output (its ops and
# their saved sizes, dims, offsets): a training loop computes the same one every step, and
# finding it costs several backward passes and ~15 bytes per logit (a large vocabulary)
PLACEMENT_CACHE_SIZE = 16
_placements: OrderedDict[tuple, tuple[int, Tensor] | None] = OrderedDict()
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list, torch.Size)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


# autograd nodes of ops that only re-arrange (or copy, cast, repeat) elements, whose saved
# sizes, dims, offsets and the shapes at both ends determine what they do; other nodes (an
# in-place op on a slice, an index, arithmetic) leave the graph uncached
REARRANGING = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "AliasBackward0",
        "TransposeBackward0",
        "TBackward0",
        "PermuteBackward0",
        "SliceBackward0",
        "SelectBackward0",
        "CloneBackward0",
        "ToCopyBackward0",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
        "UnsqueezeBackward0",
        "ExpandBackward0",
        "UnfoldBackward0",
        "DiagonalBackward0",
        "AsStridedBackward0",
        "FlipBackward0",
        "RollBackward0",
        "SplitBackward0",
        "SplitWithSizesBackward0",
        "UnbindBackward0",
        "RepeatBackward0",
    }
)


def graph_signature(x: Tensor, out: Tensor) -> tuple | None:
    """What determines how ``x`` was computed from ``out``, or ``None`` if it cannot be read.

    The chain of autograd nodes from ``x`` back to ``out`` (each a :data:`REARRANGING` op
    with one differentiable input) with their saved sizes, dims and offsets and the output
    of each it takes, and both tensors' shapes, strides, storage offsets, dtypes and output
    numbers: two calls with the same signature re-arrange the output the same way. ``None``
    (never cached) for any other node, a chain that does not reach ``out``, or saved values
    that cannot be read (a freed graph).
    """
    root = out.grad_fn
    node = x.grad_fn
    if root is None or node is None:
        return None
    nodes: list[tuple[Any, int]] = []
    while node is not root:  # first the path, then its saved values (only on the path)
        if type(node).__name__ not in REARRANGING or len(nodes) > 64:
            return None
        nexts = [(f, nr) for f, nr in node.next_functions if f is not None]
        if len(nexts) != 1:
            return None
        nodes.append((node, nexts[0][1]))
        node = nexts[0][0]
    if sum(type(n).__name__ == "ToCopyBackward0" for n, _ in nodes) > 1:
        return None  # a cast saves no dtype: the one in between two casts is not known
    chain: list[tuple] = []
    for node, nr in nodes:
        saved = []
        for name in sorted(a for a in dir(node) if a.startswith("_saved_")):
            try:
                value = getattr(node, name)
            except RuntimeError:  # saved values of a freed graph
                return None
            if not _plain(value):
                return None
            saved.append((name, value))
        chain.append((type(node).__name__, tuple(saved), nr))
    geometry = tuple(
        (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, str(t.device), t.output_nr)
        for t in (x, out)
    )
    return geometry + tuple(chain)


def _placement(x: Tensor, out: Tensor) -> tuple[int, Tensor] | None:
    """Where ``x`` sits in ``out``: ``(dim, first)``, or ``None`` (see :func:`loss_on_output`).

    ``x``'s classes (its dim 1) are ``out``'s dim ``dim``, and row ``i`` of ``x`` starts at
    ``out.reshape(-1)[first[i]]``. Cached by :func:`graph_signature`.
    """
    key = graph_signature(x, out)
    if key is not None and key in _placements:
        _placements.move_to_end(key)
        return _placements[key]
    found = _find_placement(x, out)
    if key is not None:
        _placements[key] = found
        while len(_placements) > PLACEMENT_CACHE_SIZE:
            _placements.popitem(last=False)
    return found


def _positions(first: Tensor, step: int, classes: int) -> Tensor:
    """The flat index of each row's position among the output's positions (classes removed).

    ``first``: the flat index of the row's class 0 in the output, whose classes lie along a
    dim of ``classes`` entries ``step`` apart.
    """
    return first // (step * classes) * step + first % step


def _find_placement(x: Tensor, out: Tensor) -> tuple[int, Tensor] | None:
    sel = selection(x, out)
    if sel is None or sel.shape[1] < 2:
        return None
    shape = tuple(out.shape)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    step = sel.select(1, 1) - sel.select(1, 0)
    s = int(step.reshape(-1)[0])
    dims = [d for d in range(len(shape)) if strides[d] == s and shape[d] == x.shape[1]]
    if len(dims) != 1 or not bool((step == s).all()):
        return None
    dim = dims[0]
    first = sel.select(1, 0)
    classes = torch.arange(x.shape[1], device=sel.device).reshape(1, -1, *[1] * (sel.dim() - 2))
    if not torch.equal(sel, first.unsqueeze(1) + s * classes):
        return None
    if bool((((first // s) % shape[dim]) != 0).any()):
        return None
    positions = _positions(first, s, shape[dim])
    counts = torch.bincount(positions.reshape(-1), minlength=out.numel() // shape[dim])
    if int(counts.max()) > 1:
        return None  # a position of the output used twice
    return dim, first.clone()


def loss_on_output(
    x: Tensor,
    out: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> tuple[int, Tensor] | None:
    """A cross-entropy loss on ``x`` written as the same loss on ``out``: ``(dim, target)``.

    ``x`` (classes along its dim 1) holds some of ``out``'s elements (:func:`selection`):
    the same loss is cross-entropy on ``out.movedim(dim, 1)`` against ``target`` on ``out``'s
    positions (all its dims but ``dim``), ``ignore_index`` where ``x`` has no position
    (``logits[:, :-1]``). Class-probability targets (shaped like ``x``) come back shaped
    like ``out.movedim(dim, 1)``, zero where ``x`` has no position and, for a mean, scaled
    by the ratio of ``out``'s positions to ``x``'s (torch divides such a mean by the
    positions the loss sees; the loss, its gradient and its curvature are linear in the
    probabilities; with ``label_smoothing`` they are not, and only a re-arrangement of all
    of ``out``'s positions is mapped). ``None`` when ``x`` is not such a re-arrangement (a
    class step of ``x`` must be a step along one dim of ``out``, each position of ``out`` used
    once).

    The re-arrangement is found once per graph signature (:func:`graph_signature`): a
    training loop's later calls cost an index copy, no backward pass.
    """
    soft = target.is_floating_point()
    if x.dim() < 2 or (soft and tuple(target.shape) != tuple(x.shape)):
        return None
    if soft and label_smoothing and x.numel() != out.numel():
        return None  # smoothing is not linear in the targets: unseen positions would count
    if not (x.requires_grad and out.requires_grad) or x is out:
        return None
    if not (x.is_floating_point() and out.is_floating_point()):
        return None
    placed = _placement(x, out)
    if placed is None:
        return None
    dim, first = placed
    shape = tuple(out.shape)
    s = math.prod(shape[dim + 1 :])
    moved = (*shape[:dim], *shape[dim + 1 :])
    if soft:
        classes = torch.arange(x.shape[1], device=first.device)
        classes = classes.reshape(1, -1, *[1] * (first.dim() - 1))
        p = target.new_zeros(out.numel())
        p[(first.unsqueeze(1) + s * classes).reshape(-1)] = target.reshape(-1)
        if reduction == "mean":
            p = p * (out.numel() / x.numel())
        return dim, p.reshape(shape).movedim(dim, 1)
    if target.numel() != first.numel():
        return None
    positions = _positions(first, s, shape[dim])
    y = torch.full((math.prod(moved),), ignore_index, dtype=torch.long, device=target.device)
    y[positions.reshape(-1)] = target.reshape(-1).to(torch.long)
    return dim, y.reshape(moved)


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
