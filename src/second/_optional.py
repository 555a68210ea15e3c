"""Optional dependencies: one place that imports them and says which extra to install.

``second`` needs only torch, NumPy and SciPy. Progress bars need tqdm (the ``progress``
extra; without it the work runs without a bar, after a one-line hint), plots need matplotlib
(the ``plot`` extra) and the built-in ``digits`` problem needs scikit-learn (the ``data``
extra). Every
optional import goes through :func:`require`, so a missing package always ends in the same
one-line message naming the extra, e.g. ``pip install 'second[plot]'``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

# import name -> (distribution on PyPI, the extra of ``second`` that installs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "plot"),
    "sklearn": ("scikit-learn", "data"),
    "tqdm": ("tqdm", "progress"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import an optional dependency, or raise a one-line error naming the extra to install.

    Args:
        module: the module to import, e.g. ``"matplotlib.pyplot"``.
        extra: the extra of ``second`` that installs it (default: looked up in ``EXTRAS`` by
            the top-level name).
        purpose: what needs it, for the message (default: ``"this"``).

    Returns:
        The imported module.

    Raises:
        MissingExtraError: the top-level package of ``module`` is not installed (an
            ``ImportError`` subclass; the message reads ``... pip install 'second[plot]'``).
        ImportError: any other import failure (a broken installation) propagates unchanged.

    Example:
        >>> require("math").sqrt(4.0)
        2.0
        >>> try:
        ...     require("no_such_module_xyz", extra="plot", purpose="the residual plot")
        ... except MissingExtraError as err:
        ...     print(err)
        the residual plot needs no_such_module_xyz, which is not installed: pip install 'second[plot]'
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and err.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is missing
        dist, default_extra = EXTRAS.get(top, (top, None))
        extra = extra or default_extra
        how = f"pip install 'second[{extra}]'" if extra else f"pip install {dist}"
        raise MissingExtraError(
            f"{purpose or 'this'} needs {dist}, which is not installed: {how}"
        ) from None
