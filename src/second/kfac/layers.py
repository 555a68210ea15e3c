"""The Kronecker rules of the dense layers: ``nn.Linear``, the convolutions, ``nn.Embedding``.

Each is a :class:`~second.kfac.rules.LayerRule` registered for its module type (see
:mod:`second.kfac.rules` for the matrix form and the weight-sharing modes):
:class:`~torch.nn.Linear` (any leading dimensions as positions), :class:`~torch.nn.Conv1d`,
:class:`~torch.nn.Conv2d` and :class:`~torch.nn.Conv3d` (any padding mode; patches
channel-major ``(C_in, k...)`` like the weight, output pixels as positions: KFC; one block
per group of a grouped convolution), :class:`~torch.nn.ConvTranspose1d` and
:class:`~torch.nn.ConvTranspose2d` (as the equivalent convolution),
:class:`~torch.nn.Embedding` (one-hot inputs, so the input factor is diagonal and held as
its diagonal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

from .norms import DiagonalRule
from .rules import LayerRule, _initialized

__all__: list[str] = [
    "LinearRule",
    "ConvRule",
    "ConvTransposeRule",
    "EmbeddingRule",
    "GroupedConvDiagonalRule",
    "MAX_KRONECKER_GROUPS",
]


class LinearRule(LayerRule, module_type=nn.Linear):
    """``nn.Linear`` (and subclasses keeping its forward): every leading dimension a position.

    Example:
        >>> rule = LinearRule("fc", torch.nn.Linear(3, 2, bias=False))
        >>> rule.matrix_of(torch.ones(2, 3), None).shape
        torch.Size([2, 3])
    """

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        return _initialized(cast(Tensor, module.weight), getattr(module, "bias", None))

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Linear, module)
        return m.in_features, m.out_features

    def matrix_of(self, gw: Tensor, gb: Tensor | None) -> Tensor:  # noqa: D102
        return gw if gb is None else torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def params_of(self, m: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        if not self.has_bias:
            return m, None
        return m[:, : self.d_in], m[:, self.d_in]


MAX_KRONECKER_GROUPS = 64
"""A grouped convolution with at most this many groups gets one Kronecker block per group;
one with more (a depthwise convolution over many channels) keeps its block's exact diagonal
(:class:`GroupedConvDiagonalRule`)."""


class ConvRule(LayerRule, module_type=(nn.Conv1d, nn.Conv2d, nn.Conv3d)):
    """``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: patches as rows, output pixels as positions.

    The input is padded the way the layer pads it (zeros or its ``padding_mode``, also
    ``padding="same"``), then unfolded channel-major like the weight. A grouped convolution
    (``groups`` up to :data:`MAX_KRONECKER_GROUPS`) gets one block per group: the group's
    input channels as patches, its output channels as ``d_G`` and its rows of the weight
    and bias (the curvature between groups is dropped, as between layers).

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, kernel_size=2)
        >>> ConvRule("c", conv).input_rows(torch.ones(1, 2, 3, 3)).shape
        torch.Size([1, 4, 9])
        >>> conv = torch.nn.Conv1d(2, 3, kernel_size=2, padding=1)
        >>> ConvRule("c", conv).input_rows(torch.ones(1, 2, 4)).shape
        torch.Size([1, 5, 5])
    """

    behaviour = ("forward", "_conv_forward")

    def __init__(
        self, name: str, module: nn.Module, *, weight_sharing: str = "expand", group: int = 0
    ):
        m = cast(nn.Conv2d, module)
        self.group, self.groups = group, m.groups
        self.spatial = m.weight.dim() - 2
        rows = None
        if m.groups > 1:
            per = m.out_channels // m.groups
            rows = slice(group * per, (group + 1) * per)
            name = f"{name}.group{group}" if name else f"group{group}"
        self._setup(
            name, m, m.weight, m.bias, w_rows=rows, b_rows=rows, weight_sharing=weight_sharing
        )
        self.d_in, self.d_G = self.dims(m)
        self.d_A = self.d_in + int(self.has_bias)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.Conv2d, module)
        return _initialized(m.weight, m.bias)

    @classmethod
    def build(  # noqa: D102
        cls, name: str, module: nn.Module, weight_sharing: str
    ) -> Sequence[LayerRule | DiagonalRule]:
        groups = cast(nn.Conv2d, module).groups
        if groups > MAX_KRONECKER_GROUPS:
            return [GroupedConvDiagonalRule(name, module)]
        return [cls(name, module, weight_sharing=weight_sharing, group=j) for j in range(groups)]

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Conv2d, module)
        return m.weight[0].numel(), m.out_channels // m.groups

    def _group_input(self, inp: Tensor) -> Tensor:
        """The group's input channels, padded the way the layer pads them."""
        m = cast(nn.Conv2d, self.module)
        if self.groups > 1:
            per = m.in_channels // self.groups
            inp = inp[:, self.group * per : (self.group + 1) * per]
        return _pad_like(m, inp)

    def mean_features(self, inp: Tensor) -> tuple[Tensor, int]:
        """The patches' average over the output positions, without forming the patches.

        Patch entry ``(c, i)`` at output position ``h`` is ``x[c, h s + i d]`` (stride ``s``,
        dilation ``d``, per spatial dimension), so its sum over the positions is the
        correlation of ``x[c]`` with a kernel of ones the size of the output, taken with
        stride ``d`` and dilation ``s``: one convolution of one channel, several times
        cheaper than the unfold (digits CNN: 0.4 against 1.4 ms).
        """
        m = cast(nn.Conv2d, self.module)
        x = self._group_input(inp)
        k, d, s = m.kernel_size, m.dilation, m.stride
        space = x.shape[2:]
        out = [(space[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(len(k))]
        n, C = x.shape[:2]
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(k) - 1]
        ones = x.new_ones((1, 1, *out))
        sums = conv(x.reshape(n * C, 1, *space), ones, stride=d, dilation=s)
        for axis, ki in enumerate(k):  # offsets past the kernel (a stride's slack): dropped
            sums = sums.narrow(2 + axis, 0, ki)
        T = math.prod(out)
        return (sums.reshape(n, 1, C * math.prod(k)) / T), T

    def features(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.Conv2d, self.module)
        inp = self._group_input(inp)
        k, d, s = m.kernel_size, m.dilation, m.stride
        if self.spatial == 3:
            return _unfold(inp, k, d, s)
        if self.spatial == 1:  # a 1-d convolution as a 2-d one of height 1
            inp, k, d, s = inp.unsqueeze(2), (1, k[0]), (1, d[0]), (1, s[0])
        return F.unfold(inp, k, dilation=d, stride=s).transpose(1, 2)  # [n, T, C*k...]

    def positions(self, g: Tensor) -> Tensor:  # noqa: D102
        K, n = g.shape[:2]
        if self.groups > 1:
            g = g[:, :, self.group * self.d_G : (self.group + 1) * self.d_G]
        return g.reshape(K, n, self.d_G, -1).transpose(2, 3)


def _pad_like(m: nn.Module, inp: Tensor) -> Tensor:
    """``inp`` padded the way the convolution ``m`` pads it (its ``padding_mode``)."""
    pad = cast(nn.Conv2d, m)._reversed_padding_repeated_twice
    if not any(pad):
        return inp
    mode = cast(nn.Conv2d, m).padding_mode
    return F.pad(inp, pad, mode="constant" if mode == "zeros" else mode)


_WEIGHT_GRAD = {1: conv1d_weight, 2: conv2d_weight, 3: conv3d_weight}


class GroupedConvDiagonalRule(DiagonalRule):
    """A convolution with more than :data:`MAX_KRONECKER_GROUPS` groups: its exact diagonal.

    A depthwise convolution over many channels would need one Kronecker block per channel;
    its block is kept as its exact diagonal instead, from the per-example gradients of the
    weight and bias: one grouped convolution per column, with the examples folded into the
    groups (``n * groups`` groups of the padded input and the output gradient), so no patch
    matrix is formed. Built by :class:`ConvRule` (not registered for a module type).

    Example:
        >>> conv = torch.nn.Conv2d(65, 65, kernel_size=3, padding=1, groups=65)
        >>> rule = GroupedConvDiagonalRule("dw", conv)
        >>> x, g = torch.randn(2, 65, 4, 4), torch.randn(1, 2, 65, 4, 4)
        >>> [tuple(t.shape) for t in rule.per_example(x, g)]   # weight, bias
        [(1, 2, 65, 1, 3, 3), (1, 2, 65)]
    """

    behaviour = ("forward", "_conv_forward")

    def per_example(self, inp: Tensor, g: Tensor) -> list[Tensor]:  # noqa: D102
        m = cast(nn.Conv2d, self.module)
        x = _pad_like(m, inp.detach().to(g.dtype))
        n, out = x.shape[0], []
        if self.weight is not None:
            folded = x.reshape(1, n * m.in_channels, *x.shape[2:])
            size = (n * m.out_channels, *m.weight.shape[1:])
            grad = _WEIGHT_GRAD[x.dim() - 2]
            cols = [
                grad(
                    folded,
                    size,
                    gk.reshape(1, n * m.out_channels, *gk.shape[2:]),
                    stride=m.stride,
                    dilation=m.dilation,
                    groups=n * m.groups,
                )
                for gk in g
            ]
            out.append(torch.stack(cols).reshape(g.shape[0], n, *m.weight.shape))
        if self.bias is not None:
            out.append(g.sum(tuple(range(3, g.dim()))))
        return out


def _unfold(inp: Tensor, k: tuple, d: tuple, s: tuple) -> Tensor:
    """Patches ``[n, T, C * prod(k)]`` of an (already padded) ``[n, C, *spatial]`` input.

    Channel-major like the weight, positions in the output's row-major order (any number
    of spatial dimensions; ``F.unfold`` takes two).
    """
    n, C = inp.shape[:2]
    for axis, (ki, di, si) in enumerate(zip(k, d, s)):
        # windows of the dilated kernel's span, then every di-th element of each window
        inp = inp.unfold(2 + axis, (ki - 1) * di + 1, si)[..., ::di]
    dims = len(k)
    # [n, C, *out, *k] -> [n, *out, C, *k] -> [n, T, C * prod(k)]
    order = (0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims))
    out = inp.permute(order)
    return out.reshape(n, -1, C * math.prod(k))


class ConvTransposeRule(LayerRule, module_type=(nn.ConvTranspose1d, nn.ConvTranspose2d)):
    """``nn.ConvTranspose1d``, ``nn.ConvTranspose2d`` (``groups=1``) as the convolutions they are.

    ``conv_transpose(x, W)`` is a convolution with stride 1 of ``x`` with ``stride - 1`` zeros
    inserted between its pixels, padded by ``dilation (k - 1) - padding`` (and
    ``output_padding`` at the end), with the kernel flipped and its channels swapped; the
    matrix form is that convolution's, ``[C_out, C_in k...]``. A forward called with
    ``output_size`` (another output padding) is not covered (the shapes would not match).

    Example:
        >>> conv = torch.nn.ConvTranspose2d(2, 3, kernel_size=3, stride=2, padding=1)
        >>> ConvTransposeRule("c", conv).input_rows(torch.ones(1, 2, 4, 4)).shape
        torch.Size([1, 49, 19])
    """

    @property
    def spatial(self) -> int:
        """The number of spatial dimensions (1 or 2)."""
        return len(self.w_shape) - 2

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.ConvTranspose2d, module)
        return m.groups == 1 and _initialized(m.weight, m.bias)

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.ConvTranspose2d, module)
        return m.in_channels * math.prod(m.kernel_size), m.out_channels

    def features(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.ConvTranspose2d, self.module)
        k, d, s = m.kernel_size, m.dilation, m.stride
        p, op = cast(tuple[int, ...], m.padding), m.output_padding  # never "same" here
        x = inp if self.spatial == 2 else inp.unsqueeze(2)
        if self.spatial == 1:  # as a 2-d one of height 1
            k, d, s, p, op = (1, k[0]), (1, d[0]), (1, s[0]), (0, p[0]), (0, op[0])
        n, C, H, W = x.shape
        if s != (1, 1):  # zeros between the pixels
            up = x.new_zeros(n, C, (H - 1) * s[0] + 1, (W - 1) * s[1] + 1)
            up[:, :, :: s[0], :: s[1]] = x
            x = up
        lo = [d[i] * (k[i] - 1) - p[i] for i in range(2)]  # negative: a crop
        x = F.pad(x, (lo[1], lo[1] + op[1], lo[0], lo[0] + op[0]))
        return F.unfold(x, k, dilation=d).transpose(1, 2)  # [n, T, C_in * k...]

    def positions(self, g: Tensor) -> Tensor:  # noqa: D102
        K, n = g.shape[:2]
        return g.reshape(K, n, self.d_G, -1).transpose(2, 3)

    def _flip(self) -> tuple[int, ...]:
        return tuple(range(-self.spatial, 0))

    def to_mat(self, vw: Tensor, vb: Tensor | None) -> Tensor:  # noqa: D102
        # [k, C_in, C_out, *kernel] -> the convolution's [k, C_out, C_in * kernel], flipped
        m = vw.flip(self._flip()).transpose(1, 2).reshape(vw.shape[0], self.d_G, self.d_in)
        if self.has_bias:
            if vb is None:
                raise ValueError(f"layer {self.name!r} has a bias: pass its part too")
            m = torch.cat([m, vb.unsqueeze(-1)], dim=-1)
        return m

    def from_mat(self, m: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        C_in, C_out, *kernel = self.w_shape
        vw = m[..., : self.d_in].reshape(m.shape[0], C_out, C_in, *kernel)
        vw = vw.transpose(1, 2).flip(self._flip())
        return vw, (m[..., self.d_in] if self.has_bias else None)


class EmbeddingRule(LayerRule, module_type=nn.Embedding):
    """``nn.Embedding``: one-hot inputs, so the input factor is diagonal (token counts).

    The matrix form is the weight transposed, ``[embedding_dim, num_embeddings]``; the
    "input rows" are the ``[n, T]`` indices, and positions at ``padding_idx`` are masked.
    Always ``"expand"`` (the averaged one-hot rows of ``"reduce"`` are not diagonal).

    Example:
        >>> rule = EmbeddingRule("e", torch.nn.Embedding(5, 3))
        >>> A, count = rule.a_stats(rule.input_rows(torch.tensor([[1, 1, 4]])))
        >>> A.tolist(), count
        ([0.0, 2.0, 0.0, 0.0, 1.0], 3.0)
    """

    diag_A = True
    reducible = False

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.Embedding, module)
        return m.max_norm is None and not m.sparse and not m.scale_grad_by_freq

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Embedding, module)
        return m.num_embeddings, m.embedding_dim

    def input_rows(self, inp: Tensor, weight_sharing: str | None = None) -> Tensor:  # noqa: D102
        rows = inp.reshape(inp.shape[0], -1)
        self.shared = self.shared or rows.shape[1] > 1
        return rows

    def mask(self, inp: Tensor) -> Tensor | None:  # noqa: D102
        padding_idx = cast(nn.Embedding, self.module).padding_idx
        if padding_idx is None:
            return None
        return torch.ne(inp.reshape(inp.shape[0], -1), padding_idx)

    def a_stats(self, rows: Tensor) -> tuple[Tensor, float]:  # noqa: D102
        n, T = rows.shape[0], rows.shape[1]
        idx = rows.reshape(-1)
        counts = torch.zeros(self.d_A, dtype=self.weight.dtype, device=rows.device)
        counts.index_add_(0, idx, torch.ones_like(idx, dtype=counts.dtype))
        return counts, float(n * T)

    def per_example_mats(self, arows: Tensor, grows: Tensor) -> Tensor:  # noqa: D102
        K, n, T, dG = grows.shape
        out = grows.new_zeros(K, n, dG, self.d_A)
        idx = arows.reshape(1, n, 1, T).expand(K, n, dG, T)
        return out.scatter_add_(3, idx, grows.transpose(2, 3))

    def to_mat(self, vw: Tensor, vb: Tensor | None) -> Tensor:  # noqa: D102
        return vw.transpose(1, 2)

    def from_mat(self, m: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        return m.transpose(1, 2), None
