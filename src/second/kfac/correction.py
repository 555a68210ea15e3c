r"""EK-FAC eigen-corrections: the curvature's diagonal in KFAC's eigenbasis.

.. math::

    s = w \sum_{i,k} \big(Q_G^\top\, \nabla_{W} (s_{ik}^\top f_i)\, Q_A\big)^{\circ 2},

the second moments of the per-example gradients (one per curvature column) rotated into
the Kronecker eigenbasis (George et al. 2018). With the same Fisher type this is the
diagonal of the exact block in that basis, so EK-FAC is the Frobenius-closest matrix with
KFAC's eigenvectors. A module called twice contributes the sum of its calls' gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .. import distributed as dist
from .blocks import EigenBlock
from .capture import Capture
from .rules import LayerRule

__all__ = ["eigen_corrections"]


def eigen_corrections(
    layers: Sequence[LayerRule],
    eigen: Sequence[EigenBlock],
    passes: Iterable[tuple[Tensor, Tensor, Capture]],
    *,
    distributed: bool = False,
) -> list[Tensor]:
    """The unnormalized eigen-corrections ``[d_G, d_A]`` per layer (multiply by ``w``).

    Args:
        layers: the layer rules.
        eigen: per layer, the block whose eigenbasis is used.
        passes: ``(output f, columns S, capture)`` per batch, as for the statistics.
        distributed: sum the corrections over the process group.

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
        per: dict[int, Tensor] = {}  # a module used twice: its gradients add up
        for j, inp, g in cap.backprop(out, S, retain_graph=False)[0]:
            layer = layers[j]
            # the exact per-example gradients: every position, whatever the sharing mode
            grows = layer.grad_rows(g, inp, "expand")
            mask = layer.mask(inp)
            if mask is not None:
                grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
            m = layer.per_example_mats(layer.input_rows(inp, "expand"), grows)
            per[j] = m + per[j] if j in per else m
        for j, m in per.items():
            mats = m.reshape(-1, layers[j].d_G, layers[j].d_A)
            sums[j] += (eigen[j].rotate(mats) ** 2).sum(0)
    if distributed:
        dist.all_reduce_sum(sums)
    return sums
