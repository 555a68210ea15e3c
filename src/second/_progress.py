"""Progress bars: one switch for the whole library, quiet by default when not interactive.

Whether a bar is shown is decided, in order, by the call's own ``enabled=`` argument (an
operator's ``progressbar=True``), then :func:`set_progress`, then the environment variable
``SECOND_PROGRESS`` (``0``/``false``/``off`` or ``1``/``true``/``on``), and otherwise by
whether stderr is a terminal, so logs and CI stay clean. Bars come from tqdm; without it (the
``progress`` extra) the work runs unchanged and one line says how to get bars.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TypeVar

from ._optional import MissingExtraError, require

__all__ = ["progress", "progress_enabled", "set_progress"]

T = TypeVar("T")

_setting: bool | None = None
_hinted = False

_FALSE = {"0", "false", "no", "off"}
_TRUE = {"1", "true", "yes", "on"}


def set_progress(enabled: bool | None) -> None:
    """Switch progress bars on or off for the whole library (``None``: back to automatic).

    Args:
        enabled: ``True`` shows bars on every long operation, ``False`` hides them all, ``None``
            restores the default (``SECOND_PROGRESS``, else only when stderr is a terminal).
            A call's own ``progressbar=True``/``False`` still wins over this setting.

    Example:
        >>> set_progress(False); progress_enabled()
        False
        >>> set_progress(None)
    """
    global _setting
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_progress takes True, False or None, got {enabled!r}")
    _setting = enabled


def progress_enabled(enabled: bool | None = None) -> bool:
    """Whether a bar is shown: ``enabled`` if given, else the global setting, else automatic.

    Args:
        enabled: the call's own choice (``None``: no choice).

    Returns:
        ``True`` when a bar should be drawn.

    Raises:
        ValueError: ``SECOND_PROGRESS`` holds something other than a boolean word.

    Example:
        >>> progress_enabled(True), progress_enabled(False)
        (True, False)
    """
    if enabled is not None:
        return bool(enabled)
    if _setting is not None:
        return _setting
    env = os.environ.get("SECOND_PROGRESS", "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    if env:
        raise ValueError(
            f"SECOND_PROGRESS={env!r}: expected one of 1, true, yes, on (bars) or 0, false, "
            "no, off (none), in any case, or unset (bars only when stderr is a terminal)"
        )
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool | None = None,
    leave: bool = False,
) -> Iterable[T]:
    """``iterable``, with a progress bar when bars are enabled (see :func:`progress_enabled`).

    Args:
        iterable: what to iterate over.
        total: the number of items, shown as ``k/total`` (default ``len(iterable)`` when it has
            one). Pass it for generators and loaders whose length is known otherwise.
        desc: the bar's label, e.g. ``"eigsh"``.
        unit: the item's unit (``"batch"``, ``"seed"``, ``"matvec"``...).
        enabled: the call's own choice; ``None`` follows the global switch.
        leave: keep the finished bar on screen.

    Returns:
        ``iterable`` itself when no bar is shown, else a tqdm wrapper yielding the same items.

    Example:
        >>> list(progress(range(3), desc="demo", enabled=False))
        [0, 1, 2]
    """
    if not progress_enabled(enabled):
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    try:
        tqdm = require("tqdm.auto", extra="progress", purpose="a progress bar").tqdm
    except MissingExtraError as err:
        global _hinted
        if not _hinted:
            _hinted = True
            print(f"second: {err}", file=sys.stderr)
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
