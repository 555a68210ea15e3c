"""Which tensor a loss module saw: the model's output, or a view of the same elements."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["DataKey", "data_key", "same_data", "watch_loss"]

DataKey = tuple[weakref.ref, int, int, tuple, int, bool]


def data_key(t: Tensor) -> DataKey:
    """What identifies ``t``'s elements in any view of them: its base, size and address.

    Also its shape, storage offset and contiguity (to map a view's elements back).
    """
    base = t._base if t._base is not None else t
    return (
        weakref.ref(base),
        t.numel(),
        t.data_ptr(),
        tuple(t.shape),
        int(t.storage_offset()),
        t.is_contiguous(),
    )


def same_data(a: Tensor, key: DataKey | None) -> bool:
    """Whether ``a`` holds the elements :func:`data_key` identified (``out.reshape(-1, C)``).

    Also when ``out`` itself is gone: a view keeps its base alive.
    """
    if key is None:
        return False
    base = a._base if a._base is not None else a
    return base is key[0]() and a.numel() == key[1] and a.data_ptr() == key[2]


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
