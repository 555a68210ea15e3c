r"""Layer rules: how a module's inputs, output gradients and weight become matrices.

A :class:`LayerRule` describes one kind of layer. Its weight (and bias) is viewed as a
matrix ``[d_G, d_A]``: rows indexed by outputs, columns by inputs, the bias as a last
column. The rule turns

* the layer's input into rows :math:`a_{it}` of width ``d_A`` (``input_rows``),
* the gradient at its output into rows :math:`g_{it}` of width ``d_G`` (``grad_rows``),
* parameter-shaped tensors into that matrix form and back (``to_mat``/``from_mat``).

Rules register themselves by module type: a subclass declared as
``class MyRule(LayerRule, module_type=MyModule)`` is used for every ``MyModule`` (exact
type) that its :meth:`LayerRule.supports` accepts. Adding a layer type means one rule
class and nothing else; everything downstream (statistics, blocks, operators, the
optimizer) works on the matrix form.

Built in: :class:`~torch.nn.Linear` (any leading dimensions as positions),
:class:`~torch.nn.Conv2d` (``groups=1``, zero padding; patches by
:func:`torch.nn.functional.unfold`, channel-major ``(C_in, k_h, k_w)`` like the weight,
output pixels as positions) and :class:`~torch.nn.Embedding` (one-hot inputs, so the
input factor is diagonal and held as its diagonal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "LayerRule",
    "LinearRule",
    "Conv2dRule",
    "EmbeddingRule",
    "RULES",
    "rule_for",
    "find_layers",
    "unwrap_model",
]

RULES: dict[type[nn.Module], type[LayerRule]] = {}
"""The registry: module type -> rule class (filled by ``LayerRule`` subclasses)."""


class LayerRule:
    """One layer of a supported type: its inputs, gradients and weights as matrices.

    Subclasses pass ``module_type=`` in the class statement to register themselves in
    :data:`RULES`, set ``d_in`` and ``d_G`` in :meth:`dims`, and override the methods
    whose default (a dense layer with rows ``[n, T, d_in]``) does not fit.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module, weight, bias: the module and its parameters (``bias`` may be ``None``).
        d_in, d_G: input and output widths; ``d_A = d_in + 1`` with a bias, else ``d_in``.
        diag_A: the input factor is diagonal (held as a vector of length ``d_A``).

    Example:
        >>> rule = rule_for(torch.nn.Linear(3, 2))("fc", torch.nn.Linear(3, 2))
        >>> (rule.d_G, rule.d_A), rule.input_rows(torch.ones(5, 3)).shape
        ((2, 4), torch.Size([5, 1, 4]))
    """

    module_type: ClassVar[type[nn.Module]]
    diag_A: ClassVar[bool] = False

    def __init_subclass__(cls, module_type: type[nn.Module] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if module_type is not None:
            cls.module_type = module_type
            RULES[module_type] = cls

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.weight = cast(Tensor, module.weight)
        self.bias = cast("Tensor | None", getattr(module, "bias", None))
        self.has_bias = self.bias is not None
        self.d_in, self.d_G = self.dims(module)
        self.d_A = self.d_in + int(self.has_bias)

    # -- what a subclass defines --------------------------------------------------------
    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this rule covers ``module`` (its type already matched); default yes."""
        return True

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(d_in, d_G)``: the input width (without the bias column) and the output width."""
        raise NotImplementedError

    def features(self, inp: Tensor) -> Tensor:
        """The layer input as ``[n, T, d_in]`` rows (positions ``T``), without the bias."""
        return inp.reshape(inp.shape[0], -1, self.d_in)

    # -- shared behaviour --------------------------------------------------------------
    def params(self) -> list[Tensor]:
        """The layer's parameters: ``[weight]`` or ``[weight, bias]``."""
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def input_rows(self, inp: Tensor) -> Tensor:
        """``[n, T, d_A]`` input rows, with the bias column of ones appended."""
        rows = self.features(inp)
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def grad_rows(self, g: Tensor) -> Tensor:
        """Output gradients ``[K, n, ...]`` (one per backward column) as ``[K, n, T, d_G]``."""
        K, n = g.shape[:2]
        return g.reshape(K, n, -1, self.d_G)

    def mask(self, inp: Tensor) -> Tensor | None:
        """``[n, T]`` positions that receive gradient, or ``None`` for all of them."""
        return None

    def a_stats(self, rows: Tensor) -> tuple[Tensor, float]:
        r"""``(\sum_{i,t} a_{it} a_{it}^\top, n T)`` of input rows ``[n, T, d_A]``."""
        flat = rows.reshape(-1, rows.shape[-1])
        return flat.T @ flat, float(rows.shape[0] * rows.shape[1])

    @staticmethod
    def g_stats(grows: Tensor) -> Tensor:
        r""":math:`\sum g g^\top` over all leading dimensions of gradient rows."""
        flat = grows.reshape(-1, grows.shape[-1])
        return flat.T @ flat

    def per_example_mats(self, arows: Tensor, grows: Tensor) -> Tensor:
        """``[K, n, d_G, d_A]``: per-example, per-column gradient of the weight matrix."""
        return torch.einsum("kntg,nta->knga", grows, arows)

    def to_mat(self, vw: Tensor, vb: Tensor | None) -> Tensor:
        """Parameter-shaped ``[k, *W.shape]`` (and bias ``[k, d_G]``) to ``[k, d_G, d_A]``."""
        m = vw.reshape(vw.shape[0], self.d_G, self.d_in)
        if self.has_bias:
            if vb is None:
                raise ValueError(f"layer {self.name!r} has a bias: pass its part too")
            m = torch.cat([m, vb.unsqueeze(-1)], dim=-1)
        return m

    def from_mat(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`to_mat`: ``[k, d_G, d_A]`` to ``(weight-, bias-shaped)``."""
        vw = m[..., : self.d_in].reshape(m.shape[0], *self.weight.shape)
        vb = m[..., self.d_in] if self.has_bias else None
        return vw, vb

    def matrix_of(self, gw: Tensor, gb: Tensor | None) -> Tensor:
        """One weight-shaped tensor (and bias) in matrix form (a leading 1 may remain)."""
        return self.to_mat(gw.unsqueeze(0), None if gb is None else gb.unsqueeze(0))

    def params_of(self, m: Tensor) -> tuple[Tensor, Tensor | None]:
        """The inverse of :meth:`matrix_of`."""
        vw, vb = self.from_mat(m)
        return vw[0], None if vb is None else vb[0]


class LinearRule(LayerRule, module_type=nn.Linear):
    """``nn.Linear``: inputs ``[n, ..., in]`` with every leading dimension a position.

    Example:
        >>> rule = LinearRule("fc", torch.nn.Linear(3, 2, bias=False))
        >>> rule.matrix_of(torch.ones(2, 3), None).shape
        torch.Size([2, 3])
    """

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Linear, module)
        return m.in_features, m.out_features

    def matrix_of(self, gw: Tensor, gb: Tensor | None) -> Tensor:  # noqa: D102
        return gw if gb is None else torch.cat([gw, gb.unsqueeze(1)], dim=1)

    def params_of(self, m: Tensor) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        if not self.has_bias:
            return m, None
        return m[:, : self.d_in], m[:, self.d_in]


class Conv2dRule(LayerRule, module_type=nn.Conv2d):
    """``nn.Conv2d`` with ``groups=1`` and zero padding: patches as rows, pixels as positions.

    Example:
        >>> conv = torch.nn.Conv2d(2, 3, kernel_size=2)
        >>> Conv2dRule("c", conv).input_rows(torch.ones(1, 2, 3, 3)).shape
        torch.Size([1, 4, 9])
    """

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.Conv2d, module)
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Conv2d, module)
        c, kh, kw = m.weight.shape[1:]
        return c * kh * kw, m.out_channels

    def features(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.Conv2d, self.module)
        padding = cast("tuple[int, int]", m.padding)  # zero padding by numbers: see supports
        return F.unfold(
            inp, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride
        ).transpose(1, 2)  # [n, T, C*kh*kw]

    def grad_rows(self, g: Tensor) -> Tensor:  # noqa: D102
        K, n = g.shape[:2]
        return g.reshape(K, n, self.d_G, -1).transpose(2, 3)


class EmbeddingRule(LayerRule, module_type=nn.Embedding):
    """``nn.Embedding``: one-hot inputs, so the input factor is diagonal (token counts).

    The matrix form is the weight transposed, ``[embedding_dim, num_embeddings]``; the
    "input rows" are the ``[n, T]`` indices, and positions at ``padding_idx`` are masked.

    Example:
        >>> rule = EmbeddingRule("e", torch.nn.Embedding(5, 3))
        >>> A, count = rule.a_stats(rule.input_rows(torch.tensor([[1, 1, 4]])))
        >>> A.tolist(), count
        ([0.0, 2.0, 0.0, 0.0, 1.0], 3.0)
    """

    diag_A = True

    @classmethod
    def supports(cls, module: nn.Module) -> bool:  # noqa: D102
        m = cast(nn.Embedding, module)
        return m.max_norm is None and not m.sparse

    def dims(self, module: nn.Module) -> tuple[int, int]:  # noqa: D102
        m = cast(nn.Embedding, module)
        return m.num_embeddings, m.embedding_dim

    def input_rows(self, inp: Tensor) -> Tensor:  # noqa: D102
        return inp.reshape(inp.shape[0], -1)

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


def rule_for(module: nn.Module) -> type[LayerRule] | None:
    """The registered rule class for ``module``'s exact type, or ``None`` if unsupported.

    Example:
        >>> rule_for(torch.nn.Linear(2, 2)).__name__, rule_for(torch.nn.Tanh())
        ('LinearRule', None)
    """
    cls = RULES.get(type(module))
    return cls if cls is not None and cls.supports(module) else None


def find_layers(model: nn.Module, params: Sequence[Tensor] | None = None) -> list[LayerRule]:
    """Rules for the supported modules whose parameters all require grad (and are in ``params``).

    A weight shared by two modules (weight tying) belongs to the first one found.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> " ".join(f"{r.name}:{type(r).__name__}" for r in find_layers(net))
        '0:LinearRule 2:LinearRule'
    """
    allowed = None if params is None else {id(p) for p in params}
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        cls = rule_for(m)
        if cls is None:
            continue
        rule = cls(name, m)
        ps = rule.params()
        if not all(p.requires_grad for p in ps):
            continue
        if allowed is not None and not all(id(p) in allowed for p in ps):
            continue
        ids = {id(p) for p in ps}
        if ids & seen:
            continue
        seen |= ids
        out.append(rule)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` (else ``model``).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model
