r"""Kronecker factors fitted by streaming over the data, restorable from a cache.

:class:`StreamedKFAC` and :class:`StreamedEKFAC` are :class:`~second.kfac.KFACOperator`
and :class:`~second.kfac.EKFACOperator` with two differences that matter at scale:

* the EK-FAC eigen-corrections are those of :func:`second.kfac.eigen_corrections`,
  computed from the Kronecker structure of the per-example gradients within ``memory``
  bytes (never dense per-example gradients); peak memory is the factors plus one batch.
* the statistics and corrections can be restored from a store (``store.load(stage)``)
  and are handed to it after each pass (``store.save(stage, tensors)``), so a fit
  interrupted during its second pass resumes after the first.

Both weigh every batch as :class:`~second.kfac.KFACOperator` does: by its share
:math:`W_b / W` of torch's mean over all the data (the columns of batch :math:`b` scaled
by :math:`\sqrt{W_b / n_b}` in ``_passes``, the sums divided by :math:`W`), the
eigen-corrections included; the factor :math:`N / W` is stored with the factors.
"""

from __future__ import annotations

import torch

from .. import distributed as dist
from .._errors import NonFiniteError
from ..kfac import (
    DiagonalBlock,
    EKFACOperator,
    KFACOperator,
    KroneckerBlock,
    eigen_corrections,
)
from ..kfac.correction import DEFAULT_MEMORY

__all__ = ["StreamedKFAC", "StreamedEKFAC", "DEFAULT_MEMORY"]


class _Restorable:
    """The fitting stages of a streamed KFAC/EK-FAC, each restorable from ``store``."""

    _store = None

    def _init_store(self, store) -> None:
        self._store = store

    def _restore_factors(self) -> bool:
        """Set the factors from the store's ``"factors"`` stage; ``False`` if absent."""
        st = None if self._store is None else self._store.load("factors")
        if st is None or "mean_scale" not in st:
            return False
        nl, nf = len(self.rules), len(self._fallback)  # type: ignore[attr-defined]
        self.A = [st[f"A{j}"] for j in range(nl)]
        self.G = [st[f"G{j}"] for j in range(nl)]
        self.diag = [st[f"diag{i}"] for i in range(nf)]
        self._num_data = int(st["n"].item())
        self._mean_scale = float(st["mean_scale"].item())
        self.blocks = [KroneckerBlock(A, G) for A, G in zip(self.A, self.G)]
        self.diagonals = [DiagonalBlock(d) for d in self.diag]
        return True

    def _save_factors(self) -> None:
        if self._store is None:
            return
        tensors = {f"A{j}": A for j, A in enumerate(self.A)}
        tensors.update({f"G{j}": G for j, G in enumerate(self.G)})
        tensors.update({f"diag{i}": d for i, d in enumerate(self.diag)})
        tensors["n"] = torch.tensor([self._num_data], dtype=torch.float64)
        tensors["mean_scale"] = torch.tensor([self._mean_scale], dtype=torch.float64)
        self._store.save("factors", tensors)

    def _fit_factors(self) -> None:
        self._states = None
        self._eigen = None
        if not self._restore_factors():
            self._compute_factors()  # type: ignore[attr-defined]
            self._save_factors()


class StreamedKFAC(_Restorable, KFACOperator):
    """:class:`~second.kfac.KFACOperator` whose factors a store can restore (one pass otherwise).

    Args:
        store: an object with ``load(stage) -> dict | None`` and ``save(stage, tensors)``
            (``None``: no store); other arguments as :class:`~second.kfac.KFACOperator`.
    """

    def __init__(self, *args, store=None, **kwargs):
        self._init_store(store)
        super().__init__(*args, **kwargs)

    def refresh(self) -> None:
        """Fit (or restore) the factors."""
        self._fit_factors()


class StreamedEKFAC(_Restorable, EKFACOperator):
    """:class:`~second.kfac.EKFACOperator` with streamed corrections and a restoring store.

    The eigen-corrections come from :func:`~second.kfac.eigen_corrections` within
    ``memory`` bytes (no dense per-example gradient); the factors and the corrections are restored from / saved to ``store``
    stage by stage (``"factors"`` after the first pass, ``"corrections"`` after the second).

    Args:
        store: as for :class:`StreamedKFAC`.
        memory: bytes for a block of per-example matrices (:func:`~second.kfac.eigen_corrections`).
        other arguments: as :class:`~second.kfac.EKFACOperator`.
    """

    def __init__(self, *args, store=None, memory: int = DEFAULT_MEMORY, **kwargs):
        self._init_store(store)
        self.memory = int(memory)
        super().__init__(*args, **kwargs)

    def refresh(self) -> None:
        """Fit (or restore) the factors, then the eigen-corrections (two data passes)."""
        self._fit_factors()
        kfac = self.eigen()
        st = None if self._store is None else self._store.load("corrections")
        if st is not None:
            sums = [st[f"s{j}"] for j in range(len(self.rules))]
        else:
            sums = eigen_corrections(
                self.rules,
                kfac,
                self._passes(),
                distributed=dist.active(self.distributed),
                memory=self.memory,
            )
            if self._store is not None:
                self._store.save("corrections", {f"s{j}": s for j, s in enumerate(sums)})
        for s in sums:
            if not bool(torch.isfinite(s).all()):
                raise NonFiniteError("an EK-FAC eigen-correction has NaN or Inf entries")
        # the sums weigh batch b by W_b / n_b (columns scaled in _passes): divide by W
        w = self._mean_scale / self.num_data if self.reduction == "mean" else 1.0
        self.scales = [s * w for s in sums]
        self._eigen = [e.with_eigenvalues(s) for e, s in zip(kfac, self.scales)]
