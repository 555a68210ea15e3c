"""Functions that ``torch.compile`` runs eagerly, without importing the compiler until it runs.

``torch.compiler.disable`` imports ``torch._dynamo`` (about a second of CPU, more than the
rest of ``import second`` together); applied at import time it made every ``import second``
pay for a compiler that most programs never start. :func:`eager_under_compile` defers it to
the first call made once the compiler is loaded: a program that never compiles never imports
it, and one that does gets ``torch.compiler.disable``'s behaviour (a graph break, the
function run eagerly).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["eager_under_compile"]

F = TypeVar("F", bound=Callable[..., Any])


def eager_under_compile(fn: F, recursive: bool = True) -> F:
    """``fn`` run eagerly under ``torch.compile``, as ``torch.compiler.disable(fn)`` would.

    Args:
        fn: the function (or method: the wrapper binds as ``fn`` does).
        recursive: also leave the functions ``fn`` calls uncompiled (default ``True``).

    Returns:
        A wrapper: a direct call while ``torch._dynamo`` has not been imported (no one can be
        compiling), else the call through ``torch.compiler.disable(fn)``, built once.

    Example:
        >>> def add(a, b):
        ...     return a + b
        >>> eager_under_compile(add)(1, 2)
        3
    """
    disabled: list[Callable] = []

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:  # the compiler was never loaded: not compiling
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(fn, recursive=recursive))
        return disabled[0](*args, **kwargs)

    return wrapper  # type: ignore[return-value]
