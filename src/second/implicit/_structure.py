"""Flatten tensors, tuples/lists of tensors and dicts of tensors, and put them back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Structure", "flatten"]


class Structure:
    """How a tensor, a sequence of tensors or a dict of tensors was laid out.

    ``names`` label each leaf for error messages (``"params"``, ``"hparams[1]"``,
    ``"hparams['lam']"``).
    """

    def __init__(self, kind: str, keys: Sequence[Any], names: list[str]):
        self.kind = kind  # "tensor", "tuple", "list" or "dict"
        self.keys = list(keys)
        self.names = names

    def unflatten(self, leaves: Sequence[Tensor]) -> Any:
        """Rebuild the original layout from flat leaves."""
        leaves = list(leaves)
        if self.kind == "tensor":
            return leaves[0]
        if self.kind == "dict":
            return dict(zip(self.keys, leaves, strict=True))
        if self.kind == "list":
            return leaves
        return tuple(leaves)


def flatten(obj: Any, what: str) -> tuple[list[Tensor], Structure]:
    """Leaves and layout of a tensor, a tuple/list of tensors or a dict of tensors.

    Raises:
        TypeError: ``obj`` is none of these, or holds a non-tensor.
        ValueError: it is empty.
    """
    if isinstance(obj, Tensor):
        return [obj], Structure("tensor", [], [what])
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        leaves = list(obj.values())
        names = [f"{what}[{k!r}]" for k in keys]
        kind = "dict"
    elif isinstance(obj, (tuple, list)):
        leaves = list(obj)
        keys = list(range(len(leaves)))
        names = [f"{what}[{i}]" for i in keys]
        kind = "list" if isinstance(obj, list) else "tuple"
    else:
        raise TypeError(
            f"{what} must be a tensor, a tuple/list of tensors or a dict of tensors, "
            f"got {type(obj).__name__}"
        )
    if not leaves:
        raise ValueError(f"{what} is empty")
    for name, leaf in zip(names, leaves, strict=True):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name} is a {type(leaf).__name__}, not a torch.Tensor")
    return leaves, Structure(kind, keys, names)


def detached_leaves(leaves: Sequence[Tensor], requires_grad: bool = True) -> list[Tensor]:
    """Fresh leaves that share storage with ``leaves`` and start a new graph."""
    out = []
    for t in leaves:
        d = t.detach()
        if requires_grad and (d.is_floating_point() or d.is_complex()):
            d.requires_grad_(True)
        out.append(d)
    return out


def flat_cat(ts: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in ts])


def split_like(v: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        k = t.numel()
        out.append(v[offset : offset + k].view(t.shape))
        offset += k
    return out


def zeros_for_none(like: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
    """Replace ``None`` gradients (an input the output does not depend on) by zeros."""
    return [torch.zeros_like(t) if g is None else g for t, g in zip(like, grads, strict=True)]


def hvp_matvec(grads: Sequence[Tensor], params: Sequence[Tensor]):
    """A flat-vector Hessian-vector product through an existing gradient graph.

    ``grads`` is the gradient of a loss in ``params`` built with ``create_graph=True``;
    each product is one backward pass through it (the graph is kept). Parameters the
    gradient does not depend on get zeros. Lean on purpose: it runs once per solver
    iteration, and the solvers and the final result are checked for NaN/Inf instead.
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]
    targets = [grads[i] for i in live]
    params = list(params)
    if len(params) == 1 and live:
        (g,), (p,) = targets, params
        shape = p.shape

        def matvec_one(v: Tensor) -> Tensor:
            (hv,) = torch.autograd.grad(g, p, v.view(shape), retain_graph=True, allow_unused=True)
            return torch.zeros_like(v) if hv is None else hv.reshape(-1)

        return matvec_one

    def matvec(v: Tensor) -> Tensor:
        if not live:
            return torch.zeros_like(v)
        vs = split_like(v, params)
        out = torch.autograd.grad(
            targets, params, [vs[i] for i in live], retain_graph=True, allow_unused=True
        )
        return flat_cat(zeros_for_none(params, out))

    return matvec
