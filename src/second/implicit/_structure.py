"""Flatten tensors, tuples/lists of tensors and dicts of tensors, and put them back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["Structure", "flatten", "refuse_frozen"]


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


def refuse_frozen(leaves: Sequence[Tensor], names: Sequence[str], what: str) -> None:
    """Refuse frozen parameters (an ``nn.Parameter`` with ``requires_grad=False``) as variables.

    A frozen parameter is a constant of the model: made an inner variable, it would be
    solved for (and, away from its own optimum, make the inner problem look unsolved). A
    plain tensor is taken as a variable whatever its ``requires_grad`` (a solver's output
    usually has none).

    Raises:
        ValueError: naming every frozen entry, with the one-line fix.

    Example:
        >>> frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        >>> refuse_frozen([torch.zeros(1), frozen], ["p['w']", "p['b']"], "params")
        Traceback (most recent call last):
        ...
        ValueError: params holds frozen parameters (nn.Parameter with requires_grad=False): p['b']. ...
    """
    frozen = [
        name
        for name, t in zip(names, leaves, strict=True)
        if isinstance(t, torch.nn.Parameter) and not t.requires_grad
    ]
    if frozen:
        raise ValueError(
            f"{what} holds frozen parameters (nn.Parameter with requires_grad=False): "
            f"{', '.join(frozen)}. A frozen parameter is a constant, not a variable to solve "
            f"for: leave it out of {what} (e.g. {{k: p for k, p in "
            "model.named_parameters() if p.requires_grad}; torch.func.functional_call "
            "takes the module's own value for a missing name), or set requires_grad=True "
            "if it is trained by the inner problem"
        )


def detached_leaves(leaves: Sequence[Tensor], requires_grad: bool = True) -> list[Tensor]:
    """Fresh leaves that share storage with ``leaves`` and start a new graph."""
    out = []
    for t in leaves:
        d = t.detach()
        if requires_grad and (d.is_floating_point() or d.is_complex()):
            d.requires_grad_(True)
        out.append(d)
    return out


def zeros_for_none(like: Sequence[Tensor], grads: Sequence[Tensor | None]) -> list[Tensor]:
    """Replace ``None`` gradients (an input the output does not depend on) by zeros."""
    return [torch.zeros_like(t) if g is None else g for t, g in zip(like, grads, strict=True)]
