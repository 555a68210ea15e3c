"""Deprecated spellings: one mechanism for keywords, options, attributes and functions.

A deprecated spelling keeps working for one release with a :class:`SecondDeprecationWarning`
that names the new spelling and the release that removes the old one (``docs/glossary.md``).
Shared by every layer (the Newton core, the solvers, the operators, the optimizers), so it
lives beside the warnings in the top-level internals.
"""

from __future__ import annotations

import warnings
from typing import TypeVar

from ._errors import SecondDeprecationWarning

__all__ = ["warn_deprecated", "renamed_options", "renamed_keyword", "renamed_property"]

T = TypeVar("T")

#: The release in which the deprecated spellings stop working.
REMOVAL = "0.3"


def warn_deprecated(old: str, new: str, *, detail: str = "", stacklevel: int = 2) -> None:
    """Warn that the spelling ``old`` is deprecated, naming ``new`` and the removal release.

    The one message and category of every deprecated spelling: the helpers below call it,
    and a shim that is not a plain rename (a keyword added to another, a renamed function)
    calls it directly.

    Args:
        old: the deprecated spelling as the user writes it (``"f(rtol=...)"``).
        new: what to write instead (``"tol=..."``).
        detail: a remark appended in parentheses (default: none).
        stacklevel: counted from the function that calls this, as for ``warnings.warn``
            there (default 2: that function's caller).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_deprecated("old_f", "new_f", detail="the same function")
        >>> str(caught[0].message)
        'old_f is deprecated and stops working in 0.3: use new_f (the same function)'
    """
    warnings.warn(
        f"{old} is deprecated and stops working in {REMOVAL}: use {new}"
        + (f" ({detail})" if detail else ""),
        SecondDeprecationWarning,
        stacklevel=stacklevel + 1,
    )


def renamed_options(
    owner: str,
    deprecated: dict,
    current: dict,
    defaults: dict,
    renamed: dict,
    *,
    stacklevel: int = 3,
) -> None:
    """Move deprecated keywords (``tolerance_grad``, ...) onto the glossary's names, in place.

    Args:
        owner: the optimizer's name, for the messages.
        deprecated: the extra keyword arguments the constructor received.
        current: the new names' values (updated in place).
        defaults: the new names' defaults (to tell whether both spellings were passed).
        renamed: old name -> new name.
        stacklevel: the warning's (default 3: the caller of the function that calls this).

    Raises:
        TypeError: an unknown keyword.
        ValueError: both spellings passed.
    """
    for old, val in deprecated.items():
        new = renamed.get(old)
        if new is None or new not in current:
            raise TypeError(f"{owner}() got an unexpected keyword argument {old!r}")
        warn_deprecated(f"{owner}({old}=...)", f"{new}=...", stacklevel=stacklevel)
        if current[new] != defaults[new]:
            raise ValueError(f"pass {new} only ({old} is its deprecated spelling)")
        current[new] = val


def renamed_keyword(
    owner: str, deprecated: dict, old: str, new: str, value: T | None, default: T | None = None
) -> T:
    """A function's keyword ``new``, given under it or under its deprecated spelling ``old``.

    :func:`renamed_options` for one keyword of a function (not an optimizer's). The function
    takes ``**deprecated`` and calls this only when that is not empty (or when a required
    ``new`` is missing), so the new spelling costs nothing; the warning points at the
    function's caller. A function whose ``**kwargs`` go elsewhere keeps ``old`` as a keyword
    of its own (default ``None``) and passes ``{old: value}`` when it is given.

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


def renamed_property(old: str, new: str) -> property:
    """A read-only attribute ``old``, the deprecated spelling of ``new``: reads it, warning.

    Example:
        >>> import warnings
        >>> class Record:
        ...     matvecs = 3
        ...     products = renamed_property("products", "matvecs")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     Record().products
        3
        >>> str(caught[0].message)
        'Record.products is deprecated and stops working in 0.3: use Record.matvecs'
    """

    def get(self):
        owner = type(self).__name__
        warn_deprecated(f"{owner}.{old}", f"{owner}.{new}")
        return getattr(self, new)

    return property(get, doc=f"Deprecated spelling of :attr:`{new}`.")
