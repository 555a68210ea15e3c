r"""Kronecker factors fitted by streaming over the data, restorable from a cache.

:class:`StreamedKFAC` and :class:`StreamedEKFAC` are :class:`~second.kfac.KFACOperator`
and :class:`~second.kfac.EKFACOperator` with two differences that matter at scale:

* the EK-FAC eigen-corrections come from the Kronecker structure of the per-example
  gradients (:func:`streamed_corrections`), never from dense per-example gradients: for
  a layer called once per example with one position (a ``Linear`` on vectors) the
  per-example, per-column gradient is :math:`g a^\top`, its rotation
  :math:`(Q_G^\top g)(Q_A^\top a)^\top`, and the sum of its squares over examples and
  columns one matrix product

  .. math:: s = w \sum_{i,k} (Q_G^\top g_{ik})^{\circ 2}\, \big((Q_A^\top a_i)^{\circ 2}\big)^\top
            = w\, \big[\textstyle\sum_k (g_{\cdot k} Q_G)^{\circ 2}\big]^\top (a Q_A)^{\circ 2};

  other layers (positions, several calls, embeddings) form the rotated per-example
  matrices for a few examples at a time, within ``memory`` bytes. Peak memory is the
  factors plus one batch.
* the statistics and corrections can be restored from a store (``store.load(stage)``)
  and are handed to it after each pass (``store.save(stage, tensors)``), so a fit
  interrupted during its second pass resumes after the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .. import distributed as dist
from .._errors import NonFiniteError
from ..kfac import (
    DiagonalBlock,
    EigenBlock,
    EKFACOperator,
    KFACOperator,
    KroneckerBlock,
    backprop_columns,
)
from ..kfac.capture import Capture
from ..kfac.rules import LayerRule

__all__ = ["StreamedKFAC", "StreamedEKFAC", "streamed_corrections", "DEFAULT_MEMORY"]

DEFAULT_MEMORY = 256 * 2**20
"""Bytes a block of rotated per-example matrices may take (layers with positions)."""


def _rows(layer: LayerRule, inp: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Input rows ``[n, T, d_A]`` and gradient rows ``[K, n, T, d_G]``, padding masked."""
    arows = layer.input_rows(inp, "expand")  # exact per-example gradients: every position
    grows = layer.grad_rows(g, inp, "expand")
    mask = layer.mask(inp)
    if mask is not None:
        grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
    return arows, grows


def streamed_corrections(
    layers: Sequence[LayerRule],
    eigen: Sequence[EigenBlock],
    passes: Iterable[tuple[Tensor, Tensor, Capture]],
    *,
    memory: int = DEFAULT_MEMORY,
) -> list[Tensor]:
    r"""The unnormalized EK-FAC eigen-corrections ``[d_G, d_A]`` per layer (times ``w`` later).

    The same sums as :func:`second.kfac.eigen_corrections`,
    :math:`\sum_{i,k} (Q_G^\top \nabla_W(s_{ik}^\top f_i)\, Q_A)^{\circ 2}`, computed
    from the rotated input and gradient rows (module docstring): one matrix product per
    layer and batch when the layer has one call and one position per example, otherwise
    rotated per-example matrices for as many examples as fit in ``memory`` bytes.

    Args:
        layers: the layer rules.
        eigen: per layer, the block whose eigenbasis is used.
        passes: ``(output f, columns S, capture)`` per batch.
        memory: bytes one block of per-example matrices may take.

    Returns:
        Per layer, the sums over examples and columns of the squared rotated gradients.
    """
    sums = [
        torch.zeros(layer.d_G, layer.d_A, dtype=layer.weight.dtype, device=layer.weight.device)
        for layer in layers
    ]
    for out, S, cap in passes:
        js = [j for j in range(len(layers)) if j in cap.outputs]
        outs = [o for j in js for o in cap.outputs[j]]
        gouts = backprop_columns(out, S, outs, retain_graph=False)
        pos = 0
        for j in js:
            layer, E = layers[j], eigen[j]
            calls = []
            for inp in cap.inputs[j]:
                arows, grows = _rows(layer, inp, gouts[pos])
                pos += 1
                gr = grows @ E.QG  # rows of Q_G^T g
                ar = arows if E.QA is None else arows @ E.QA
                calls.append((ar, gr))
            if len(calls) == 1 and not layer.diag_A and calls[0][0].shape[1] == 1:
                ar, gr = calls[0]
                g2 = (gr[:, :, 0, :] ** 2).sum(0)  # [n, d_G], summed over columns
                sums[j] += g2.T @ (ar[:, 0, :] ** 2)
                continue
            K, n = calls[0][1].shape[:2]
            step = max(1, memory // max(1, K * layer.d_G * layer.d_A * sums[j].element_size()))
            for s in range(0, n, step):
                per = None
                for ar, gr in calls:  # a module used twice: its gradients add up
                    m = layer.per_example_mats(ar[s : s + step], gr[:, s : s + step])
                    per = m if per is None else per + m
                sums[j] += (per**2).sum((0, 1))  # type: ignore[operator]
    return sums


class _Restorable:
    """The fitting stages of a streamed KFAC/EK-FAC, each restorable from ``store``."""

    _store = None

    def _init_store(self, store) -> None:
        self._store = store

    def _restore_factors(self) -> bool:
        """Set the factors from the store's ``"factors"`` stage; ``False`` if absent."""
        st = None if self._store is None else self._store.load("factors")
        if st is None:
            return False
        nl, nf = len(self.rules), len(self._fallback)  # type: ignore[attr-defined]
        self.A = [st[f"A{j}"] for j in range(nl)]
        self.G = [st[f"G{j}"] for j in range(nl)]
        self.diag = [st[f"diag{i}"] for i in range(nf)]
        self._num_data = int(st["n"].item())
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

    The eigen-corrections come from :func:`streamed_corrections` (no dense per-example
    gradient); the factors and the corrections are restored from / saved to ``store``
    stage by stage (``"factors"`` after the first pass, ``"corrections"`` after the second).

    Args:
        store: as for :class:`StreamedKFAC`.
        memory: bytes for a block of per-example matrices (:func:`streamed_corrections`).
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
            sums = streamed_corrections(self.rules, kfac, self._passes(), memory=self.memory)
            if dist.active(self.distributed):
                dist.all_reduce_sum(sums)
            if self._store is not None:
                self._store.save("corrections", {f"s{j}": s for j, s in enumerate(sums)})
        for s in sums:
            if not bool(torch.isfinite(s).all()):
                raise NonFiniteError("an EK-FAC eigen-correction has NaN or Inf entries")
        w = 1.0 / self.num_data if self.reduction == "mean" else 1.0
        self.scales = [s * w for s in sums]
        self._eigen = [e.with_eigenvalues(s) for e, s in zip(kfac, self.scales)]
