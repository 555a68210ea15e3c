"""Arguments in another library's order: recognise them and say the right order.

curvlinops builds its operators as ``HessianLinearOperator(model, loss, params, data)``; ours
take ``(model, loss_fn, data, params=None)``. Passed in curvlinops' order, the parameters land
in ``data`` and the data in ``params``, and the first error a user met was about "parameter 0"
being a tuple. :func:`check_argument_order` recognises the swap from the arguments alone and
raises a ``TypeError`` that names the order to use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["check_argument_order"]


def _looks_like_params(obj: Any) -> bool:
    """A non-empty list/tuple of tensors that require grad, or a generator of parameters."""
    if isinstance(obj, nn.Module | Tensor | Mapping):
        return False
    if isinstance(obj, list | tuple) and obj:
        return all(isinstance(p, Tensor) and p.requires_grad for p in obj)
    return False


def _looks_like_data(obj: Any) -> bool:
    """A DataLoader, an ``(X, y)`` pair of tensors, or a non-empty list of such pairs."""
    if isinstance(obj, torch.utils.data.DataLoader):
        return True
    if isinstance(obj, list | tuple) and obj:
        if len(obj) == 2 and all(isinstance(t, Tensor) for t in obj):
            return not all(t.requires_grad for t in obj)  # two parameters are not a batch
        return all(isinstance(b, list | tuple | Mapping) and not _looks_like_params(b) for b in obj)
    return False


def check_argument_order(owner: str, data: Any, params: Any) -> None:
    """Raise a clear error when ``data`` and ``params`` come in curvlinops' order.

    Args:
        owner: the class or function being called, for the message (e.g. ``"HessianOperator"``).
        data: what was passed as ``data`` (third positional argument).
        params: what was passed as ``params`` (fourth positional argument, may be ``None``).

    Raises:
        TypeError: ``data`` holds parameters (tensors that require grad) and ``params`` holds
            data or is missing; the message names both orders.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Linear(2, 1)
        >>> X, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> check_argument_order("HessianOperator", (X, y), list(model.parameters()))  # fine
        >>> try:
        ...     check_argument_order("HessianOperator", list(model.parameters()), [(X, y)])
        ... except TypeError as err:
        ...     print(str(err).split(";")[0])
        HessianOperator(model, loss_fn, data, params=None) takes the data third and the parameters fourth
    """
    if not _looks_like_params(data):
        return
    if params is not None and not _looks_like_data(params):
        return
    got = "parameters as `data`" + (" and data as `params`" if params is not None else "")
    raise TypeError(
        f"{owner}(model, loss_fn, data, params=None) takes the data third and the parameters "
        f"fourth; it got {got}. This looks like curvlinops' order (model, loss, params, data): "
        f"call {owner}(model, loss_fn, data, params) instead (params may be left out: the "
        "model's parameters that require grad are used)."
    )
