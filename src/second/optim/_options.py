"""The optimizers' hyperparameter checks and the deprecated spellings of their options."""

from __future__ import annotations

import math

__all__ = [
    "RENAMED",
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
