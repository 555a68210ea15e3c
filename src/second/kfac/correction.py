r"""EK-FAC eigen-corrections: the curvature's diagonal in KFAC's eigenbasis.

.. math::

    s = w \sum_{i,k} \big(Q_G^\top\, \nabla_{W} (s_{ik}^\top f_i)\, Q_A\big)^{\circ 2},

the second moments of the per-example gradients (one per curvature column) rotated into
the Kronecker eigenbasis (George et al. 2018). With the same Fisher type this is the
diagonal of the exact block in that basis, so EK-FAC is the Frobenius-closest matrix with
KFAC's eigenvectors. A module called twice contributes the sum of its calls' gradients.

The sums come from the Kronecker structure of the per-example gradients, never from dense
per-example gradients of the whole batch: for a layer called once per example with one
position (a ``Linear`` on vectors) the per-example, per-column gradient is :math:`g a^\top`,
its rotation :math:`(Q_G^\top g)(Q_A^\top a)^\top`, and the sum of its squares over
examples and columns one matrix product

.. math:: s = w \sum_{i,k} (Q_G^\top g_{ik})^{\circ 2}\, \big((Q_A^\top a_i)^{\circ 2}\big)^\top
          = w\, \big[\textstyle\sum_k (g_{\cdot k} Q_G)^{\circ 2}\big]^\top (a Q_A)^{\circ 2};

other layers (positions, several calls, embeddings) form the rotated per-example matrices
for as many examples at a time as fit in ``memory`` bytes. Peak memory is one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .. import distributed as dist
from .blocks import EigenBlock
from .capture import Capture
from .rules import LayerRule

__all__ = ["eigen_corrections", "DEFAULT_MEMORY"]

DEFAULT_MEMORY = 256 * 2**20
"""Bytes a block of rotated per-example matrices may take (layers with positions)."""


def eigen_corrections(
    layers: Sequence[LayerRule],
    eigen: Sequence[EigenBlock],
    passes: Iterable[tuple[Tensor, Tensor, Capture]],
    *,
    distributed: bool = False,
    memory: int = DEFAULT_MEMORY,
) -> list[Tensor]:
    """The unnormalized eigen-corrections ``[d_G, d_A]`` per layer (multiply by ``w``).

    One matrix product per layer and batch when the layer has one call and one position
    per example; otherwise rotated per-example matrices for as many examples as fit in
    ``memory`` bytes (module docstring).

    Args:
        layers: the layer rules.
        eigen: per layer, the block whose eigenbasis is used.
        passes: ``(output f, columns S, capture)`` per batch, as for the statistics.
        distributed: sum the corrections over the process group.
        memory: bytes one block of rotated per-example matrices may take.

    Returns:
        Per layer, the sums over examples and columns of the squared rotated gradients.

    Example:
        >>> from second.kfac import find_layers, curvature_columns, KroneckerBlock
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> layers = find_layers(net)
        >>> with Capture(layers) as cap:
        ...     f = net(torch.tensor([[1.0, 0.0]]))
        >>> S = curvature_columns(torch.nn.MSELoss(reduction="sum"), f, None, "sum", "type2")
        >>> E = KroneckerBlock(torch.eye(2), torch.eye(1)).eigen()
        >>> eigen_corrections(layers, [E], [(f, S, cap)])[0].round(decimals=5)   # 2 x^2, one datum
        tensor([[2., 0.]])
    """
    sums = [
        torch.zeros(layer.d_G, layer.d_A, dtype=layer.weight.dtype, device=layer.weight.device)
        for layer in layers
    ]
    for out, S, cap in passes:
        calls: dict[int, list[tuple[Tensor, Tensor]]] = {}  # per layer, its calls' rotated rows
        for j, inp, g in cap.backprop(out, S, retain_graph=False)[0]:
            calls.setdefault(j, []).append(_rotated_rows(layers[j], eigen[j], inp, g))
        for j, rows in calls.items():
            _add_squares(sums[j], layers[j], rows, memory)
    if distributed:
        dist.all_reduce_sum(sums)
    return sums


def _rotated_rows(layer: LayerRule, E: EigenBlock, inp: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Input rows ``[n, T, d_A] @ Q_A`` and gradient rows ``[K, n, T, d_G] @ Q_G``, padding masked."""
    arows = layer.input_rows(inp, "expand")  # the exact per-example gradients: every position
    grows = layer.grad_rows(g, inp, "expand")
    mask = layer.mask(inp)
    if mask is not None:
        grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
    return (arows if E.QA is None else arows @ E.QA), grows @ E.QG


def _add_squares(
    total: Tensor, layer: LayerRule, calls: list[tuple[Tensor, Tensor]], memory: int
) -> None:
    """Add to ``total`` the squares of one layer's rotated per-example, per-column gradients."""
    if len(calls) == 1 and not layer.diag_A and calls[0][0].shape[1] == 1:
        ar, gr = calls[0]
        g2 = (gr[:, :, 0, :] ** 2).sum(0)  # [n, d_G], summed over columns
        total += g2.T @ (ar[:, 0, :] ** 2)
        return
    K, n = calls[0][1].shape[:2]
    step = max(1, memory // max(1, K * layer.d_G * layer.d_A * total.element_size()))
    for s in range(0, n, step):
        per = None
        for ar, gr in calls:  # a module used twice: its gradients add up
            m = layer.per_example_mats(ar[s : s + step], gr[:, s : s + step])
            per = m if per is None else per + m
        total += (per**2).sum((0, 1))  # type: ignore[operator]
