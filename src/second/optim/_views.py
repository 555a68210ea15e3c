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
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "depends_on",
    "selection",
    "affine_selection",
    "path_kind",
    "graph_signature",
    "loss_on_output",
    "LossView",
    "loss_point",
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
    be differentiated twice (``torch.compile``'s, or one already freed). See
    :func:`affine_selection`, which also takes a scaled or shifted selection.
    """
    found = affine_selection(x, out)
    return found[0] if found is not None and found[1] == 1.0 and not found[2] else None


def affine_selection(x: Tensor, out: Tensor) -> tuple[Tensor, float, bool] | None:
    r"""``(sel, scale, shifted)`` with ``x = scale * out.reshape(-1)[sel] + shift``.

    ``x`` is computed from ``out`` by the ops of :data:`SELECTING` (views, slices, copies,
    indexing, concatenation) and arithmetic with constants (:data:`AFFINE`: a temperature,
    a logit bias, an additive mask): a linear function :math:`x = s\,M\,\mathrm{out} + c`
    with a 0/1 matrix :math:`M` that has one 1 per row, a number :math:`s` and a constant
    :math:`c`. ``shifted`` says whether a sum with a constant is on the path (then ``x``'s
    values are not ``scale`` times ``out``'s). ``None`` for any other graph (found by a
    walk of the graph, no backward pass), for a linear map that is not such a selection, or
    a graph that cannot be differentiated twice. :math:`M t` is found by differentiating :math:`M^\top u` (one
    backward with its graph) with respect to :math:`u`, and the indices go through it in
    digits small enough for the dtype to carry exactly. Costs a few backward passes over the
    graph between ``out`` and ``x``.
    """
    kind = path_kind(x, out)
    if kind is None:
        return None
    try:
        found = _search(x, out, exact=kind == "selection")
    except _OUT_OF_MEMORY:
        raise
    except RuntimeError:  # no double backward through the graph: not a map we can find
        return None
    return None if found is None else (found[0], found[1], kind == "shifted")


def _search(x: Tensor, out: Tensor, exact: bool) -> tuple[Tensor, float] | None:
    """See :func:`affine_selection` (which turns its autograd errors into ``None``)."""
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

    # a graph of copies only (`exact`: path_kind checked every node) is a selection by
    # construction: its indices are read in one or two passes; arithmetic on the path needs
    # the checks that the map is one number times a selection
    scale = 1.0
    if not exact:
        ones = apply(torch.ones_like(out))
        if ones is None or ones.numel() == 0:
            return None
        scale = float(ones.reshape(-1)[0])
        if not (math.isfinite(scale) and scale != 0 and bool((ones == scale).all())):
            return None
    n = out.numel()
    bits = min(int(-math.log2(torch.finfo(t.dtype).eps)) for t in (out, x))
    # integers both dtypes carry exactly; times a scale, each rounding is off by a few
    # units in the last place, so the digits keep half the bits and are rounded
    base = 2 ** min(bits, 24) if scale == 1.0 else 2 ** max(bits // 2, 2)
    flat = torch.arange(n, device=out.device) if n > base else None
    sel: Tensor | None = None
    step = 1
    while True:
        if flat is None:  # one digit: the indices themselves (no integer division)
            digit = torch.arange(n, dtype=out.dtype, device=out.device).reshape(out.shape)
        else:
            digit = ((flat // step) % base).to(out.dtype).reshape(out.shape)
        part = apply(digit)
        if part is None:
            return None
        if scale != 1.0:
            part = part / scale
            if not bool(((part - part.round()).abs() <= 0.25).all()):
                return None
            part = part.round()
        elif not exact and not bool((part == part.round()).all()):
            return None  # a weighted average, not a selection
        index = part.long()
        sel = index if sel is None else sel.add_(index, alpha=step)
        step *= base
        if step >= n:
            break
    assert sel is not None
    if int(sel.min()) < 0 or int(sel.max()) >= n:
        return None
    if exact:
        return sel, scale
    # a fixed probe from a generator of its own: the user's random stream stays untouched
    probe_gen = torch.Generator(device=out.device).manual_seed(0)
    probe = torch.rand(out.shape, dtype=out.dtype, device=out.device, generator=probe_gen)
    moved = apply(probe)
    if moved is None:
        return None
    want = probe.reshape(-1)[sel].to(moved.dtype)
    if scale == 1.0:
        if not torch.equal(moved, want):
            return None
    elif not torch.allclose(moved, scale * want, rtol=64 * torch.finfo(moved.dtype).eps, atol=0):
        return None
    return sel, scale


# re-arrangements found, by the graph between the loss input and the output (its ops and
# their saved sizes, dims, offsets): a training loop computes the same one every step, and
# finding it costs several backward passes and ~15 bytes per logit (a large vocabulary)
PLACEMENT_CACHE_SIZE = 16
_placements: OrderedDict[tuple, Placement | None] = OrderedDict()
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


# nodes whose outputs are elements of their inputs, the index ones included (their indices
# change from call to call, so graphs with them are searched every time, never cached)
SELECTING = REARRANGING | frozenset(
    {
        "SqueezeBackward3",
        "SqueezeBackward4",
        "SqueezeBackward5",
        "TransposeBackward1",
        "AsStridedBackward1",
        "LazyCloneBackward0",
        "NarrowCopyBackward0",
        "ReshapeCopyBackward0",
        "UnsafeSplitBackward0",
        "UnsafeSplitWithSizesBackward0",
        "IndexBackward0",
        "UnsafeIndexBackward0",
        "IndexSelectBackward0",
        "GatherBackward0",
        "MaskedSelectBackward0",
        "TakeBackward0",
        "CatBackward0",
        "StackBackward0",
        "BackwardHookFunctionBackward",
    }
)

# arithmetic with a constant operand (one differentiable input; a factor or divisor that is a
# number): a temperature, a logit bias, an additive mask
AFFINE = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0", "NegBackward0"})


def _constant_operand(node: Any, position: int) -> Any:
    """The constant operand of an :data:`AFFINE` node differentiated at input ``position``.

    ``None`` where there is none to read (a sum's constant is not saved), else the number
    (a 0-dim tensor's value and dtype), or ``False`` when it is not a number.
    """
    name = type(node).__name__
    if name not in ("MulBackward0", "DivBackward0"):
        return None
    if name == "DivBackward0" and position != 0:
        return False  # c / out is not linear in out
    try:
        c = getattr(node, "_saved_other" if position == 0 else "_saved_self")
    except RuntimeError:  # a freed graph
        return False
    if not isinstance(c, Tensor) or c.dim() != 0:
        return False
    return (float(c), c.dtype)


def path_kind(x: Tensor, out: Tensor, limit: int = 256) -> str | None:
    """How ``x`` was computed from ``out``, by a walk of ``x``'s autograd graph.

    ``"selection"`` when every node between them is one of :data:`SELECTING`, ``"scaled"``
    when :data:`AFFINE` products or quotients with numbers are among them too, ``"shifted"``
    when sums with constants are (with or without products), and ``None`` for any
    other node, a path that ends elsewhere than at ``out`` (``x`` depends on another tensor
    that requires gradients), or more than ``limit`` nodes.
    """
    if x is out or not (x.requires_grad and out.requires_grad) or x.grad_fn is None:
        return None
    leaf = out.grad_fn is None
    goal = (out.grad_fn, out.output_nr)
    kind = "selection"
    seen: set = set()
    stack = [(x.grad_fn, x.output_nr)]
    while stack:
        node, nr = stack.pop()
        if (node, nr) == goal or (leaf and getattr(node, "variable", None) is out):
            continue
        if node is goal[0] or node in seen:
            if node is goal[0]:
                return None  # another output of the node that made `out`
            continue
        seen.add(node)
        if len(seen) > limit:
            return None
        name = type(node).__name__
        edges = [(i, fn, k) for i, (fn, k) in enumerate(node.next_functions) if fn is not None]
        if name in AFFINE:
            if len(edges) != 1 or _constant_operand(node, edges[0][0]) is False:
                return None
            shift = name in ("AddBackward0", "SubBackward0")
            kind = "shifted" if shift or kind == "shifted" else "scaled"
        elif name not in SELECTING or not edges or len(edges) != len(node.next_functions):
            return None  # not a copy, or a copy that takes some elements from a constant
        stack.extend((fn, k) for _, fn, k in edges)
    return kind


def graph_signature(x: Tensor, out: Tensor) -> tuple | None:
    """What determines how ``x`` was computed from ``out``, or ``None`` if it cannot be read.

    The chain of autograd nodes from ``x`` back to ``out`` (each a :data:`REARRANGING` op,
    or :data:`AFFINE` arithmetic with a number or a constant, with one differentiable input)
    with their saved sizes, dims, offsets and numbers, the input of each that is
    differentiated and the output of the next it takes, and both tensors' shapes, strides,
    storage offsets, dtypes and output numbers: two calls with the same signature
    re-arrange (and scale) the output the same way; a shift's constant may differ. ``None``
    (never cached) for any other node, a chain that does not reach ``out``, or saved values
    that cannot be read (a freed graph).
    """
    root = out.grad_fn
    node = x.grad_fn
    if root is None or node is None:
        return None
    nodes: list[tuple[Any, int, int]] = []
    while node is not root:  # first the path, then its saved values (only on the path)
        name = type(node).__name__
        if not (name in REARRANGING or name in AFFINE) or len(nodes) > 64:
            return None
        nexts = [(i, f, nr) for i, (f, nr) in enumerate(node.next_functions) if f is not None]
        if len(nexts) != 1:
            return None
        nodes.append((node, nexts[0][2], nexts[0][0]))
        node = nexts[0][1]
    if sum(type(n).__name__ == "ToCopyBackward0" for n, _, _ in nodes) > 1:
        return None  # a cast saves no dtype: the one in between two casts is not known
    chain: list[tuple] = []
    for node, nr, position in nodes:
        saved = []
        affine = type(node).__name__ in AFFINE
        if affine:  # its operand: a number (a shift's constant does not change the map)
            constant = _constant_operand(node, position)
            if constant is False:
                return None
            saved.append(("constant", constant))
        for name in sorted(a for a in dir(node) if a.startswith("_saved_")):
            if affine and name in ("_saved_self", "_saved_other"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # saved values of a freed graph
                return None
            if not _plain(value):
                return None
            saved.append((name, value))
        chain.append((type(node).__name__, tuple(saved), nr, position))
    geometry = tuple(
        (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, str(t.device), t.output_nr)
        for t in (x, out)
    )
    return geometry + tuple(chain)


class Placement(NamedTuple):
    """Where a loss input ``x`` sits in the output ``out`` (:func:`_placement`)."""

    dim: int  # x's classes (its dim 1) are out's dim `dim`
    first: Tensor  # row i of x starts at out.reshape(-1)[first[i]]
    scale: float  # x = scale * (those elements) + a constant
    shifted: bool  # a sum with a constant on the path: x's values are not scale * out's


class LossView(NamedTuple):
    """A cross-entropy loss on ``x`` as the same loss on ``out`` (:func:`loss_on_output`)."""

    dim: int  # the loss' classes are out's dim `dim`
    target: Tensor | None  # on out's positions (or probabilities like out.movedim(dim, 1))
    scale: float = 1.0  # d x / d out on the elements x holds
    values: Tensor | None = None  # x's values in out.movedim(dim, 1)'s layout, when shifted


def _placement(x: Tensor, out: Tensor) -> Placement | None:
    """Where ``x`` sits in ``out``, or ``None`` (see :func:`loss_on_output`).

    Cached by :func:`graph_signature`.
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


def _elements(first: Tensor, step: int, classes: int) -> Tensor:
    """The flat index in the output of each element of ``x`` (``first`` plus its class)."""
    k = torch.arange(classes, device=first.device).reshape(1, -1, *[1] * (first.dim() - 1))
    return first.unsqueeze(1) + step * k


def _find_placement(x: Tensor, out: Tensor) -> Placement | None:
    found = affine_selection(x, out)
    if found is None or found[0].shape[1] < 2:
        return None
    sel, scale, shifted = found
    shape = tuple(out.shape)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    step = sel.select(1, 1) - sel.select(1, 0)
    s = int(step.reshape(-1)[0])
    dims = [d for d in range(len(shape)) if strides[d] == s and shape[d] == x.shape[1]]
    if len(dims) != 1 or not bool((step == s).all()):
        return None
    dim = dims[0]
    first = sel.select(1, 0)
    if not torch.equal(sel, _elements(first, s, x.shape[1])):
        return None
    if bool((((first // s) % shape[dim]) != 0).any()):
        return None
    positions = _positions(first, s, shape[dim])
    counts = torch.bincount(positions.reshape(-1), minlength=out.numel() // shape[dim])
    if int(counts.max()) > 1:
        return None  # a position of the output used twice
    return Placement(dim, first.clone(), scale, shifted)


def loss_on_output(
    x: Tensor,
    out: Tensor,
    target: Tensor,
    ignore_index: int,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> LossView | None:
    r"""A cross-entropy loss on ``x`` written as the same loss on ``out`` (a :class:`LossView`).

    ``x`` (classes along its dim 1) holds some of ``out``'s elements
    (:func:`affine_selection`), possibly times a number and plus a constant (a temperature,
    a logit bias, an additive mask): the same loss is cross-entropy on ``out.movedim(dim,
    1)`` against ``target`` on ``out``'s positions (all its dims but ``dim``),
    ``ignore_index`` where ``x`` has no position (``logits[:, :-1]``), evaluated at ``x``'s
    values: ``scale`` times ``out``'s, or ``values`` (``x``'s in that layout) when ``x`` is
    shifted; :math:`\partial x / \partial\,\mathrm{out}` = ``scale`` on the elements
    ``x`` holds.
    Class-probability targets (shaped like ``x``) come back shaped like ``out.movedim(dim,
    1)``, zero where ``x`` has no position and, for a mean, scaled by the ratio of ``out``'s
    positions to ``x``'s (torch divides such a mean by the positions the loss sees; the
    loss, its gradient and its curvature are linear in the probabilities; with
    ``label_smoothing`` they are not, and only a re-arrangement of all of ``out``'s positions
    is mapped). ``None`` when ``x`` is not such a function of ``out`` (a class step of ``x``
    must be a step along one dim of ``out``, each position of ``out`` used once).

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
    dim, first = placed.dim, placed.first
    shape = tuple(out.shape)
    s = math.prod(shape[dim + 1 :])
    moved = (*shape[:dim], *shape[dim + 1 :])
    values = None
    if placed.shifted:  # the loss is evaluated at x's values (out's where x has none)
        index = _elements(first, s, x.shape[1]).reshape(-1)  # unique: scatter, not index_put
        v = out.detach().reshape(-1).scatter(0, index, x.detach().reshape(-1).to(out.dtype))
        values = v.reshape(shape).movedim(dim, 1)
    if soft:
        p = target.new_zeros(out.numel())
        p[_elements(first, s, x.shape[1]).reshape(-1)] = target.reshape(-1)
        if reduction == "mean":
            p = p * (out.numel() / x.numel())
        return LossView(dim, p.reshape(shape).movedim(dim, 1), placed.scale, values)
    if target.numel() != first.numel():
        return None
    positions = _positions(first, s, shape[dim])
    y = torch.full((math.prod(moved),), ignore_index, dtype=torch.long, device=target.device)
    y[positions.reshape(-1)] = target.reshape(-1).to(torch.long)
    return LossView(dim, y.reshape(moved), placed.scale, values)


def loss_point(f: Tensor, view: LossView) -> Tensor:
    """The loss input's values in the layout of ``f``, the output with the loss' classes on dim 1.

    ``f`` itself, ``scale * f``, or the shifted ``values``.
    """
    if view.values is not None:
        return view.values
    return f.detach() * view.scale if view.scale != 1.0 else f


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
