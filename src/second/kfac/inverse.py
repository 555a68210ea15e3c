"""The inverses of the damped KFAC and EK-FAC approximations, block by block.

:meth:`KFACOperator.inverse <second.kfac.KFACOperator.inverse>` and
:meth:`EKFACOperator.inverse <second.kfac.EKFACOperator.inverse>` return them: every
Kronecker block is inverted in its factors' eigenbasis, every fallback block entrywise, the
damping applied at every product. A (near-)singular block is refused, with the reason.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._deprecation import warn_deprecated
from ..func.dense import eigenvalue_cutoff
from ..operators.base import LinearOperator

if TYPE_CHECKING:
    from .operators import KFACOperator

__all__ = ["KFACInverseOperator", "EKFACInverseOperator"]


def _inverse_damping(op: KFACOperator, damping: float | None) -> float:
    """The damping :meth:`KFACOperator.inverse` uses; warns where it replaces the own one."""
    if damping is None:
        return op.damping
    if op.damping:  # not a rename: the meaning changes in 0.3 (it will add, as elsewhere)
        name = type(op).__name__
        warn_deprecated(
            f"{name}.inverse(damping={damping:g}) replacing the operator's own damping "
            f"{op.damping:g} (it inverts B_undamped + {damping:g} I)",
            f"a {name} built with damping=0 and inverse(damping={damping:g}), or inverse() for "
            "the operator's own damping",
            detail="both mean the same now and in 0.3, when inverse(damping=...) adds to the "
            "operator's own damping as A.inverse(method, damping=...) and second.solve(A, b, "
            "damping=...) do",
            stacklevel=3,
        )
    return damping


def _refuse_singular(why: str, damping: float) -> None:
    raise ValueError(
        f"the approximation is singular ({why}; e.g. a constant input feature, or a "
        "LayerNorm before a Linear layer, whose inputs sum to 0): pass damping > 0 to invert "
        "it"
        + (
            f" (larger than {damping:.1e}: that one is below the rounding level)"
            if damping > 0
            else ""
        )
    )


class _EigenInverse(LinearOperator):
    """``(B + damping)^{-1}`` block by block, damping applied at every product."""

    psd = True

    def __init__(self, base: KFACOperator, damping: float, split: str):
        super().__init__(base.shape[0], base.dtype, base.device)
        self.layout, self.damping, self.split = base.layout, damping, split
        self.blocks, self.diagonals = base.eigen(), base.diagonals
        # A null eigenvalue of a block comes out of the eigendecomposition (and EK-FAC's
        # squares of rotated gradients) as rounding noise, +-1e-17 or 1e-33 rather than 0:
        # second's one cutoff (docs/glossary.md, "cutoff") tells it from a real eigenvalue,
        # relative to the block's largest. A diagonal block's entries are exact (sums of
        # squares), so only a zero one is singular there.
        # With damping > 0 the damped block is invertible whatever its null directions, as
        # long as the damping is above the rounding noise of its eigenvalues (eps times the
        # largest): then a null eigenvalue's +-noise cannot cancel it; the cutoff is for the
        # undamped inverse.
        for j, b in enumerate(self.blocks):
            s = b.damped_eigenvalues(damping, split)
            if damping > 0:
                top = float(b.eigenvalues.abs().max())
                noise = torch.finfo(s.dtype).eps * top
                if bool((s <= 0).any()) or (
                    damping <= noise and bool((b.eigenvalues <= noise).any())
                ):
                    _refuse_singular(
                        f"block {j} has a (near-)null eigenvalue and the damping {damping:.1e} "
                        f"is below the rounding level {noise:.1e} of its eigenvalues (largest "
                        f"{top:.1e}; use a larger damping or float64)",
                        damping,
                    )
                continue
            cut = eigenvalue_cutoff(s, dtype=s.dtype)
            if bool((s <= cut).any()):
                _refuse_singular(
                    f"block {j} has an eigenvalue {float(s.min()):.1e} within the rounding "
                    f"cutoff {cut:.1e} of its largest {float(s.abs().max()):.1e}",
                    damping,
                )
        for d in self.diagonals:
            if bool((d.diagonal + damping <= 0).any()):
                _refuse_singular("a diagonal block has a zero entry", damping)

    def _matmat(self, V: Tensor) -> Tensor:
        lam, split = self.damping, self.split
        return self.layout.apply(
            V,
            lambda j, M: self.blocks[j].solve(M, lam, split),
            lambda i, v: self.diagonals[i].solve(v, lam),
        )

    def _matvec(self, v: Tensor) -> Tensor:
        return self._matmat(v.unsqueeze(1)).squeeze(1)


class KFACInverseOperator(_EigenInverse):
    """Inverse of a damped KFAC approximation (see :meth:`KFACOperator.inverse`)."""


class EKFACInverseOperator(_EigenInverse):
    """Inverse of a damped EK-FAC approximation (see :meth:`EKFACOperator.inverse`)."""
