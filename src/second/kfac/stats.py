r"""Factor statistics: per-layer sums plus counts, merged by plain addition.

For layer :math:`l` the statistics are :math:`\sum_{i,t} a_{it} a_{it}^\top` with its count
:math:`\sum_i T_i` (the input factor is their quotient) and :math:`\sum_{i,k,t} g_{ikt} g_{ikt}^\top`
(the gradient factor is it times :math:`w = 1/N` for a mean-reduced loss, 1 for a sum),
plus, for parameters outside the supported layers, a Rademacher estimate of the curvature
diagonal. Sums and counts from batches, or from the ranks of a process group, merge by
addition (:meth:`FactorStats.all_reduce`, through :mod:`second.distributed`);
:meth:`FactorStats.ema` folds them into running averages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import distributed as dist
from .capture import Capture
from .rules import LayerRule

__all__ = ["FactorStats", "batch_statistics", "add_layer_statistics"]


def _rademacher(shape, like: Tensor, generator) -> Tensor:
    r = torch.randint(0, 2, shape, generator=generator, device=like.device)
    return (2 * r - 1).to(like.dtype)


class FactorStats:
    """Sums of factor statistics over batches (and ranks) with their counts.

    Args:
        layers: the layer rules.
        fallback_params: parameters that get a diagonal estimate.
        lazy: keep each batch's rows (:meth:`add_rows`) instead of forming ``a^T a`` and
            ``g^T g``, so a consumer can fold them into its own sums (one ``addmm``).

    Attributes:
        A, G: per layer, the sums (``None`` until a batch adds to them).
        nA: per layer, the count of input rows.
        diag: per fallback parameter, the sum of the diagonal estimate (or ``None``).
        n: the number of examples.

    Example:
        >>> from second.kfac import find_layers
        >>> layer = find_layers(torch.nn.Linear(2, 1, bias=False))[0]
        >>> st = FactorStats([layer], [])
        >>> st.add(0, torch.eye(2), 4.0, torch.ones(1, 1)); st.n = 4
        >>> st.tensors()[0] / st.nA[0]
        tensor([[0.2500, 0.0000],
                [0.0000, 0.2500]])
    """

    def __init__(
        self,
        layers: Sequence[LayerRule],
        fallback_params: Sequence[Tensor],
        lazy: bool = False,
    ):
        self.layers, self.fallback_params = list(layers), list(fallback_params)
        self.lazy = lazy
        self.A: list[Tensor | None] = [None] * len(self.layers)
        self.G: list[Tensor | None] = [None] * len(self.layers)
        self.nA = [0.0] * len(self.layers)
        self.diag: list[Tensor | None] = [None] * len(self.fallback_params)
        self.n = 0.0
        # pending rows ``(a [m, d_A], g [m', d_G])`` whose products are not formed yet
        self.rows: list[list[tuple[Tensor, Tensor]]] = [[] for _ in self.layers]

    def add(self, j: int, A: Tensor, nA: float, G: Tensor) -> None:
        """Add sums ``A`` (count ``nA``) and ``G`` to layer ``j``."""
        At, Gt = self.A[j], self.G[j]
        self.A[j] = A if At is None else At + A
        self.G[j] = G if Gt is None else Gt + G
        self.nA[j] += nA

    def add_rows(self, j: int, a: Tensor, nA: float, g: Tensor) -> None:
        """Add ``a^T a`` and ``g^T g`` later (see :meth:`take_rows`, :meth:`tensors`)."""
        self.rows[j].append((a, g))
        self.nA[j] += nA

    def take_rows(self, j: int) -> list[tuple[Tensor, Tensor]]:
        """The pending rows of layer ``j`` (its products with ``A[j]``, ``G[j]`` still to add)."""
        rows, self.rows[j] = self.rows[j], []
        return rows

    def merge(self, other: FactorStats) -> None:
        """Add ``other``'s sums, pending rows and counts (statistics of the same layers)."""
        for j in range(len(self.layers)):
            Ao, Go = other.A[j], other.G[j]
            if Ao is not None and Go is not None:
                self.add(j, Ao, 0.0, Go)
            self.rows[j].extend(other.rows[j])
            self.nA[j] += other.nA[j]
        for i, d in enumerate(other.diag):
            if d is not None:
                self.add_diagonal(i, d)
        self.n += other.n

    def add_diagonal(self, i: int, d: Tensor) -> None:
        """Add to the diagonal estimate of fallback parameter ``i``."""
        cur = self.diag[i]
        self.diag[i] = d if cur is None else cur + d

    def tensors(self) -> list[Tensor]:
        """Form pending products and zero-fill: ``[A_0, G_0, A_1, ..., diag_0, ...]``."""
        A_sums, G_sums, diags = self.sums()
        return [t for A, G in zip(A_sums, G_sums) for t in (A, G)] + diags

    def sums(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Form pending products and zero-fill; return the sums ``(A, G, diag)`` per layer."""
        for j in range(len(self.rows)):
            for a, g in self.take_rows(j):
                self.add(j, a.T @ a, 0.0, g.T @ g)  # rows counted when they were added
        A_sums, G_sums, diags = [], [], []
        for j, layer in enumerate(self.layers):
            w = layer.weight
            At, Gt = self.A[j], self.G[j]
            if At is None or Gt is None:
                shape = (layer.d_A,) if layer.diag_A else (layer.d_A, layer.d_A)
                At, Gt = w.new_zeros(shape), w.new_zeros(layer.d_G, layer.d_G)
                self.A[j], self.G[j] = At, Gt
            A_sums.append(At)
            G_sums.append(Gt)
        for i, p in enumerate(self.fallback_params):
            d = self.diag[i]
            if d is None:
                d = self.diag[i] = torch.zeros_like(p)
            diags.append(d)
        return A_sums, G_sums, diags

    def all_reduce(self) -> None:
        """Sum the statistics and counts over the process group (every rank gets all)."""
        ts = self.tensors()
        ref = self.layers[0].weight if self.layers else self.fallback_params[0]
        # the counts in float64, apart: in a half-precision weight's dtype they would be
        # rounded (bfloat16 is exact only up to 256) or overflow (float16 at 65504)
        counts = torch.tensor([self.n, *self.nA], dtype=torch.float64, device=ref.device)
        dist.all_reduce_sum(ts)
        dist.all_reduce_sum(counts)
        self.n = float(counts[0])
        self.nA = [float(c) for c in counts[1:]]

    def ema(
        self,
        A_run: Sequence[Tensor],
        G_run: Sequence[Tensor],
        diag_run: Sequence[Tensor],
        beta: float,
        weight: float,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        r"""The running averages with these statistics folded in, as new tensors.

        :math:`\bar A \leftarrow \beta \bar A + (1-\beta) A_{sum}/n_A`,
        :math:`\bar G \leftarrow \beta \bar G + (1-\beta)\,w\,G_{sum}` and the same for
        the diagonals; pending rows go in with one ``addmm`` per factor. The inputs are not
        modified, so a consumer can check the result (finite?) before it commits it.

        Args:
            A_run: per layer, the running input factor.
            G_run: per layer, the running gradient factor.
            diag_run: per fallback parameter, the running diagonal.
            beta: the decay :math:`\beta \in [0, 1)`.
            weight: :math:`w` (``1/n`` for a mean-reduced loss, 1 for a sum).

        Returns:
            ``(A, G, diag)``: the new running averages, one tensor per layer or parameter.

        Example:
            >>> from second.kfac import find_layers
            >>> layer = find_layers(torch.nn.Linear(1, 1, bias=False))[0]
            >>> st = FactorStats([layer], [])
            >>> st.add(0, torch.tensor([[4.0]]), 2.0, torch.tensor([[6.0]]))
            >>> A, G, _ = st.ema([torch.zeros(1, 1)], [torch.zeros(1, 1)], [], 0.5, 1.0)
            >>> A, G
            ([tensor([[1.]])], [tensor([[3.]])])
        """
        A_new: list[Tensor] = []
        G_new: list[Tensor] = []
        for j in range(len(self.layers)):
            At, Gt = A_run[j], G_run[j]
            rows = self.take_rows(j)
            if rows and self.A[j] is None:
                # the running average and the batch products in one addmm per factor
                bA, aA, aG = beta, (1 - beta) / max(self.nA[j], 1.0), (1 - beta) * weight
                for a, g in rows:
                    a, g = a.to(At.dtype), g.to(Gt.dtype)
                    At = torch.addmm(At, a.T, a, beta=bA, alpha=aA)
                    Gt = torch.addmm(Gt, g.T, g, beta=bA, alpha=aG)
                    bA = 1.0
                A_new.append(At)
                G_new.append(Gt)
                continue
            for a, g in rows:  # (not reached: a layer's statistics are either rows or sums)
                self.add(j, a.T @ a, 0.0, g.T @ g)
            A_sum, G_sum = self.A[j], self.G[j]
            if A_sum is None or G_sum is None:
                A_new.append(At * beta)
                G_new.append(Gt * beta)
                continue
            A_new.append(torch.add(At * beta, A_sum, alpha=(1 - beta) / max(self.nA[j], 1.0)))
            G_new.append(torch.add(Gt * beta, G_sum, alpha=(1 - beta) * weight))
        d_new: list[Tensor] = []
        for i, d in enumerate(diag_run):
            d_sum = self.diag[i] if self.diag else None
            d_new.append(
                d * beta if d_sum is None else torch.add(d * beta, d_sum, alpha=(1 - beta) * weight)
            )
        return A_new, G_new, d_new


def add_layer_statistics(
    stats: FactorStats,
    j: int,
    layer: LayerRule,
    inp: Tensor,
    g: Tensor,
    keep: Tensor | None = None,
) -> None:
    """Add one call of layer ``j``: its input ``inp`` and backpropagated columns ``g [K, ...]``.

    Padding positions (``layer.mask``, e.g. an embedding's padding index) are dropped from
    the input factor and zeroed in the gradient factor; so are the examples ``keep`` marks
    ``False`` (``[n]``; examples whose loss terms are all ignored), or the positions (``[n,
    T]``: ignored targets of a sequence), when the call's rows lead with that shape.

    Example:
        >>> from second.kfac import find_layers
        >>> layer = find_layers(torch.nn.Linear(2, 1, bias=False))[0]
        >>> st = FactorStats([layer], [])
        >>> add_layer_statistics(st, 0, layer, torch.ones(3, 2), torch.ones(1, 3, 1))
        >>> st.A[0], st.nA[0], st.G[0]
        (tensor([[3., 3.],
                [3., 3.]]), 3.0, tensor([[3.]]))
    """
    # rows from an autocast forward (bfloat16, float16) are summed in float32 at least
    if inp.is_floating_point() and inp.dtype != g.dtype:
        inp = inp.to(torch.promote_types(inp.dtype, g.dtype))
    if g.dtype in (torch.bfloat16, torch.float16):
        g = g.float()
        inp = inp.float() if inp.is_floating_point() else inp
    arows = layer.input_rows(inp)
    grows = layer.grad_rows(g, inp)
    mask = layer.mask(inp)
    if (
        keep is not None
        and keep.dim() > 1
        and arows.shape[0] == keep.numel()
        and (arows.dim() == 2 or arows.shape[1] == 1)
    ):
        keep = keep.reshape(-1)  # positions, where the rows come flattened
    if keep is not None and keep.dim() > 1:
        # positions are matched by shape alone ([B, T] rows of a [T, B] layout look the same
        # when B == T): drop only rows that carry no gradient, as ignored positions do
        lead = tuple(keep.shape)
        if (
            tuple(arows.shape[: keep.dim()]) != lead
            or tuple(grows.shape[1 : 1 + keep.dim()]) != lead
            or bool(grows[:, ~keep].ne(0).any())
        ):
            # a layer with a row per example (an encoder before a per-position head): the
            # examples whose positions are all ignored, if their rows carry no gradient
            keep = keep.reshape(keep.shape[0], -1).any(1)
            if (
                arows.shape[0] != keep.shape[0]
                or grows.shape[1] != keep.shape[0]
                or bool(grows[:, ~keep].ne(0).any())
            ):
                keep = None
    if (
        keep is not None
        and tuple(arows.shape[: keep.dim()]) == tuple(keep.shape)
        and not bool(keep.all())
    ):
        if layer.diag_A:  # index rows [n, T] (an embedding): through the mask
            rows = keep.reshape(*keep.shape, *[1] * (arows.dim() - keep.dim())).expand(arows.shape)
            mask = rows if mask is None else mask & rows
        elif keep.dim() > 1:  # dense rows of positions: keep them as one batch of positions
            arows, grows = arows[keep].unsqueeze(0), grows[:, keep].unsqueeze(1)
        else:  # dense rows: drop the examples
            arows, grows = arows[keep], grows[:, keep]
    if mask is not None:
        arows = arows[mask].reshape(1, -1)
        grows = grows * mask.reshape(1, *mask.shape, 1).to(grows.dtype)
    if layer.diag_A or not stats.lazy:
        A, nA = layer.a_stats(arows)
        stats.add(j, A, nA, layer.g_stats(grows))
    else:
        a = arows.reshape(-1, arows.shape[-1])
        stats.add_rows(j, a, float(a.shape[0]), grows.reshape(-1, grows.shape[-1]))


def batch_statistics(
    layers: Sequence[LayerRule],
    fallback_params: Sequence[Tensor],
    f: Tensor,
    S: Tensor,
    capture: Capture,
    stats: FactorStats,
    *,
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
    keep: Tensor | None = None,
) -> None:
    """Add one batch's statistics: columns ``S`` backpropagated from the output ``f``.

    ``keep`` (``[n]``): examples whose inputs count in the input factors (see
    :func:`add_layer_statistics`).

    ``capture`` holds the batch's layer calls. Fallback parameters of the capture's
    exact-diagonal rules (normalization layers) get the squared per-example gradients;
    the other fallback diagonals use columns with Rademacher signs per example and column
    (drawn from ``generator``), unbiased for the curvature diagonal and exact with one
    datum.

    Example:
        >>> from second.kfac import find_layers, curvature_columns
        >>> net = torch.nn.Linear(2, 1, bias=False)
        >>> layers = find_layers(net)
        >>> with Capture(layers) as cap:
        ...     f = net(torch.ones(3, 2))
        >>> S = curvature_columns(torch.nn.MSELoss(reduction="sum"), f, None, "sum", "type2")
        >>> st = FactorStats(layers, [])
        >>> batch_statistics(layers, [], f, S, cap, st)
        >>> st.G[0].round(decimals=5), st.n   # 3 examples, output Hessian 2 each
        (tensor([[6.]]), 3.0)
    """
    exact = {id(p) for rule in capture.diagonal for p in rule.params()}
    rademacher = [(i, p) for i, p in enumerate(fallback_params) if id(p) not in exact]
    extra: list[Tensor] = []
    if rademacher:
        # one backward for everything: the layers' statistics are sums of squares of each
        # example's column, so the signs leave them unchanged
        eps = _rademacher((S.shape[0], S.shape[1]), S, generator)
        S = S * eps.reshape(eps.shape + (1,) * (S.dim() - 2))
        extra = [p for _, p in rademacher]
    calls, dcalls, gp = capture.backprop_with(f, S, extra, retain_graph=retain_graph, diagonal=True)
    for (i, _), g in zip(rademacher, gp):
        stats.add_diagonal(i, (g * g).sum(0))
    for j, inp, g in calls:
        add_layer_statistics(stats, j, layers[j], inp, g, keep)
    index = {id(p): i for i, p in enumerate(fallback_params)}
    for r, inp, g in dcalls:
        rule = capture.diagonal[r]
        for p, d in zip(rule.params(), rule.squared_grads(inp, g)):
            if id(p) in index:
                stats.add_diagonal(index[id(p)], d)
    stats.n += f.shape[0]
