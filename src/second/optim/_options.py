"""The optimizers' hyperparameter checks and the deprecated spellings of their options."""

from __future__ import annotations

import math
import warnings
from typing import TypeVar

from .._errors import SecondDeprecationWarning

__all__ = [
    "RENAMED",
    "renamed_options",
    "renamed_keyword",
    "hyperparameters",
    "check_newton_options",
    "check_positive",
    "check_nonneg",
    "check_unit",
    "check_int",
]

#: Deprecated keyword spellings of the Newton-type optimizers and the glossary's names.
RENAMED = {
    "tolerance_grad": "gtol",
    "max_iter": "maxiter",
    "cg_max_iter": "cg_maxiter",
    "cg_rtol": "cg_tol",
}

T = TypeVar("T")


def renamed_options(
    owner: str,
    deprecated: dict,
    current: dict,
    defaults: dict,
    renamed: dict | None = None,
    *,
    stacklevel: int = 3,
) -> None:
    """Move deprecated keywords (``tolerance_grad``, ...) onto the glossary's names, in place.

    Args:
        owner: the optimizer's name, for the messages.
        deprecated: the extra keyword arguments the constructor received.
        current: the new names' values (updated in place).
        defaults: the new names' defaults (to tell whether both spellings were passed).
        renamed: old name -> new name (default: the Newton-type optimizers' ``RENAMED``).
        stacklevel: the warning's (default 3: the caller of the function that calls this).

    Raises:
        TypeError: an unknown keyword.
        ValueError: both spellings passed.
    """
    for old, val in deprecated.items():
        new = (RENAMED if renamed is None else renamed).get(old)
        if new is None or new not in current:
            raise TypeError(f"{owner}() got an unexpected keyword argument {old!r}")
        warnings.warn(
            f"{owner}({old}=...) is deprecated and stops working in 0.3: use {new}=...",
            SecondDeprecationWarning,
            stacklevel=stacklevel,
        )
        if current[new] != defaults[new]:
            raise ValueError(f"pass {new} only ({old} is its deprecated spelling)")
        current[new] = val


def renamed_keyword(
    owner: str, deprecated: dict, old: str, new: str, value: T | None, default: T | None = None
) -> T:
    """A function's keyword ``new``, given under it or under its deprecated spelling ``old``.

    :func:`renamed_options` for one keyword of a function (not an optimizer). The function
    takes ``**deprecated`` and calls this only when that is not empty (or when a required
    ``new`` is missing), so the new spelling costs nothing; the warning points at the
    function's caller.

    Args:
        owner: the function's name, for the messages.
        deprecated: the extra keyword arguments the function received.
        old: the deprecated spelling.
        new: the glossary's name.
        value: what the function received as ``new``.
        default: ``new``'s default (``None``: a required keyword).

    Raises:
        TypeError: an unknown keyword, or ``new`` given under neither spelling (or as ``None``).
        ValueError: both spellings passed.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     renamed_keyword("f", {"rtol": 1e-3}, "rtol", "tol", None)
        0.001
        >>> str(caught[0].message)
        'f(rtol=...) is deprecated and stops working in 0.3: use tol=...'
    """
    current = {new: value}
    renamed_options(owner, deprecated, current, {new: default}, {old: new}, stacklevel=4)
    result = current[new]
    if result is None:
        raise TypeError(f"{owner}() missing required keyword argument {new!r}")
    return result


def check_positive(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonneg(name: str, value: float) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_unit(name: str, value: float, *, closed: bool = False) -> None:
    """Raise ``ValueError`` unless ``0 < value < 1`` (``<= 1`` with ``closed``)."""
    ok = isinstance(value, (int, float)) and 0 < value and (value <= 1 if closed else value < 1)
    if not ok:
        raise ValueError(f"{name} must lie in (0, 1{']' if closed else ')'}, got {value!r}")


def check_int(name: str, value: int, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def hyperparameters(arguments: dict) -> dict:
    """A constructor's arguments (its ``locals()``) as torch.optim's ``defaults``.

    Everything but ``self``, ``params``, ``seed``, ``model``, ``loss_fn``,
    ``preconditioner`` and the ``deprecated`` keywords.

    Example:
        >>> hyperparameters(dict(self=None, params=[], lr=0.1, betas=(0.9, 0.99), seed=0))
        {'lr': 0.1, 'betas': (0.9, 0.99)}
    """
    skip = ("self", "params", "seed", "model", "loss_fn", "preconditioner", "deprecated")
    return {k: v for k, v in arguments.items() if k not in skip and k != "__class__"}


def check_newton_options(options: dict) -> None:
    """Raise ``ValueError`` for a shared Newton-type option out of range (those present).

    ``maxiter``, ``cg_maxiter`` (or ``None``): integers >= 1; ``cg_tol`` (or ``None``) in
    ``(0, 1)``; ``gtol``, ``tolerance_change`` >= 0; with ``min_damping``: ``damping``,
    ``min_damping``, ``max_damping`` > 0 and ``min_damping <= damping <= max_damping``.
    """
    for name in ("maxiter", "cg_maxiter"):
        if options.get(name) is not None:
            check_int(name, options[name])
    if options.get("cg_tol") is not None:
        check_unit("cg_tol", options["cg_tol"])
    for name in ("gtol", "tolerance_change"):
        if name in options:
            check_nonneg(name, options[name])
    if "min_damping" in options:
        lam, lo, hi = options["damping"], options["min_damping"], options["max_damping"]
        for name, value in (("damping", lam), ("min_damping", lo), ("max_damping", hi)):
            check_positive(name, value)
        if not lo <= lam <= hi:
            raise ValueError(f"damping {lam} must lie in [min_damping, max_damping]")
