"""Exact-diagonal rules of the normalization layers: LayerNorm, RMSNorm, GroupNorm, BatchNorm.

A :class:`DiagonalRule` keeps a layer's block as its exact diagonal, from the squared
per-example gradients of its affine parameters; it registers with ``module_type=`` in the
registry of :mod:`second.kfac.rules` like a :class:`~second.kfac.rules.LayerRule`.
"""

from __future__ import annotations

from typing import ClassVar, cast

from torch import Tensor, nn
from torch.nn import functional as F

from .rules import _initialized, _register

__all__ = [
    "DiagonalRule",
    "LayerNormRule",
    "RMSNormRule",
    "GroupNormRule",
    "BatchNormRule",
]


class DiagonalRule:
    r"""A layer whose block is kept as its exact diagonal: per-example gradients squared.

    Subclasses register with ``module_type=`` like :class:`LayerRule` and define
    :meth:`per_example` (the per-example, per-column gradients of the parameters from
    the layer's input and the gradient at its output). The block's diagonal is then
    :math:`w\sum_{i,k} (\partial s_{ik}^\top f_i/\partial\theta)^2`: the exact diagonal
    of the GGN (``fisher="type2"``) or of the Fisher estimate in use.

    Attributes:
        name, module: the module and its name.
        weight, bias: its affine parameters (either may be ``None``).

    Example:
        >>> ln = torch.nn.LayerNorm(3)
        >>> rule = LayerNormRule("ln", ln)
        >>> x, g = torch.randn(2, 3), torch.ones(1, 2, 3)
        >>> [tuple(t.shape) for t in rule.squared_grads(x, g)]   # weight, bias
        [(3,), (3,)]
    """

    module_type: ClassVar[type[nn.Module]]
    behaviour: ClassVar[tuple[str, ...]] = ("forward",)
    functional: ClassVar[bool] = False
    modules: list[nn.Module]

    def __init_subclass__(cls, module_type: type[nn.Module] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        _register(cls, module_type)

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module, self.modules = name, module, [module]
        self.weight = cast("Tensor | None", getattr(module, "weight", None))
        self.bias = cast("Tensor | None", getattr(module, "bias", None))

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether the module has trainable affine parameters to cover."""
        ps = [getattr(module, "weight", None), getattr(module, "bias", None)]
        return any(p is not None for p in ps) and _initialized(*ps)

    @classmethod
    def build(cls, name: str, module: nn.Module, weight_sharing: str) -> list[DiagonalRule]:
        """The rule of ``module`` (one)."""
        return [cls(name, module)]

    def params(self) -> list[Tensor]:
        """The affine parameters (weight, then bias; those that exist)."""
        return [p for p in (self.weight, self.bias) if p is not None]

    def keys(self) -> set[tuple[int, int]]:
        """``(id(parameter), 0)`` of the parameters."""
        return {(id(p), 0) for p in self.params()}

    def normalized(self, inp: Tensor) -> Tensor:
        """The layer's normalized input, before the affine map."""
        raise NotImplementedError

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:
        """Dimensions of ``x [n, ...]`` summed over for the per-example gradients."""
        raise NotImplementedError

    def per_example(self, inp: Tensor, g: Tensor) -> list[Tensor]:
        """Per-example, per-column gradients ``[K, n, *p.shape]`` of :meth:`params`."""
        xh = self.normalized(inp.detach()).to(g.dtype)
        dims = tuple(d + 1 for d in self.channel_dims(xh))  # g has the leading K
        out = []
        if self.weight is not None:
            out.append((g * xh).sum(dims) if dims else g * xh)
        if self.bias is not None:
            out.append(g.sum(dims) if dims else g)
        return [t.reshape(t.shape[0], t.shape[1], *p.shape) for t, p in zip(out, self.params())]

    def squared_grads(self, inp: Tensor, g: Tensor) -> list[Tensor]:
        r""":math:`\sum_{k,i}` of the squared per-example gradients, shaped like :meth:`params`."""
        return [(t * t).sum((0, 1)) for t in self.per_example(inp, g)]

    def approximation(self) -> str:
        """``"diagonal-exact"``."""
        return "diagonal-exact"


class LayerNormRule(DiagonalRule, module_type=nn.LayerNorm):
    r"""``nn.LayerNorm``: :math:`\hat x = (x - \mu)/\sigma` over the normalized shape.

    Example:
        >>> LayerNormRule("ln", torch.nn.LayerNorm(3)).normalized(torch.tensor([[1.0, 2.0, 3.0]]))
        tensor([[-1.2247,  0.0000,  1.2247]])
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.LayerNorm, self.module)
        return F.layer_norm(inp, m.normalized_shape, None, None, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        nd = len(cast(nn.LayerNorm, self.module).normalized_shape)
        return tuple(range(1, x.dim() - nd))


class RMSNormRule(DiagonalRule, module_type=nn.RMSNorm):
    r"""``nn.RMSNorm``: :math:`\hat x = x / \mathrm{rms}(x)` over the normalized shape.

    Example:
        >>> RMSNormRule("norm", torch.nn.RMSNorm(2)).normalized(torch.tensor([[3.0, 4.0]]))
        tensor([[0.8485, 1.1314]])
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.RMSNorm, self.module)
        return F.rms_norm(inp, m.normalized_shape, None, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        nd = len(cast(nn.RMSNorm, self.module).normalized_shape)
        return tuple(range(1, x.dim() - nd))


class GroupNormRule(DiagonalRule, module_type=nn.GroupNorm):
    """``nn.GroupNorm``: per-channel scale and shift of the group-normalized input.

    Example:
        >>> rule = GroupNormRule("gn", torch.nn.GroupNorm(1, 2))
        >>> rule.normalized(torch.tensor([[[1.0], [3.0]]])).flatten()
        tensor([-1.0000,  1.0000])
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.GroupNorm, self.module)
        return F.group_norm(inp, m.num_groups, None, None, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        return tuple(range(2, x.dim()))


class BatchNormRule(DiagonalRule, module_type=nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d/2d/3d): the running statistics in eval mode, the batch's in training.

    In training mode an example's output depends on the whole batch; the per-example
    gradients of the affine parameters are still exact (the normalized input does not
    depend on them), the GGN itself couples the examples.

    Example:
        >>> rule = BatchNormRule("bn", torch.nn.BatchNorm1d(2).eval())  # running mean 0, var 1
        >>> rule.normalized(torch.tensor([[1.0, 3.0]])), rule.approximation()
        (tensor([[1.0000, 3.0000]]), 'diagonal-exact')
    """

    def normalized(self, inp: Tensor) -> Tensor:  # noqa: D102
        m = cast(nn.BatchNorm1d, self.module)
        batch = m.training or m.running_mean is None
        rm, rv = (None, None) if batch else (m.running_mean, m.running_var)
        return F.batch_norm(inp, rm, rv, None, None, batch, 0.0, m.eps)

    def channel_dims(self, x: Tensor) -> tuple[int, ...]:  # noqa: D102
        return tuple(range(2, x.dim()))
