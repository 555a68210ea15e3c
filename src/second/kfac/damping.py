r"""Damping of a Kronecker block: exact, or split between the factors (pi-damping).

The damped block is :math:`A \otimes G + \lambda I` (**exact** damping). Its inverse needs
the eigendecompositions of both factors. **Pi-damping** (Martens & Grosse 2015, section
6.3) replaces it by the Kronecker product

.. math::

    (A + \pi\sqrt\lambda\, I) \otimes (G + \tfrac{\sqrt\lambda}{\pi} I),\qquad
    \pi = \sqrt{\frac{\mathrm{tr} A / d_A}{\mathrm{tr} G / d_G}},

whose inverse is the Kronecker product of the damped factors' inverses. The damping is
always an argument, applied when a block is multiplied or solved, never stored in it.
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["DAMPING_SPLITS", "check_damping", "pi_factor", "pi_split"]

DAMPING_SPLITS = ("exact", "pi")
"""How a damping enters a Kronecker block: added to the whole block, or split (pi)."""


def check_damping(damping: float) -> float:
    """``damping`` as a float, checked to be finite and ``>= 0``.

    Raises:
        ValueError: a negative or non-finite damping.

    Example:
        >>> check_damping(1e-3)
        0.001
    """
    lam = float(damping)
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    return lam


def pi_factor(lA: Tensor, lG: Tensor) -> float:
    r""":math:`\pi = \sqrt{\mathrm{mean}(l_A) / \mathrm{mean}(l_G)}` from the factors' eigenvalues.

    (The means of the eigenvalues are the normalized traces.) Returns 1 when either mean
    is not positive.

    Example:
        >>> pi_factor(torch.tensor([4.0, 4.0]), torch.tensor([1.0]))
        2.0
    """
    tA, tG = float(lA.mean()), float(lG.mean())
    if tA <= 0 or tG <= 0:
        return 1.0
    return math.sqrt(tA / tG)


def pi_split(damping: float, pi: float) -> tuple[float, float]:
    r"""The pi-split of :math:`\lambda`: ``(pi sqrt(lambda), sqrt(lambda) / pi)`` for ``(A, G)``.

    Example:
        >>> pi_split(4.0, 2.0)
        (4.0, 1.0)
    """
    r = math.sqrt(damping)
    return r * pi, r / pi
