"""Attention (and weight normalization) that second-order autodiff can go through."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["differentiable_attention"]


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    r"""Run :func:`torch.nn.functional.scaled_dot_product_attention` with its math kernel.

    PyTorch's fused attention kernels (flash, memory-efficient, the CPU flash kernel) have no
    derivative of their backward and no forward-mode rule, so a Hessian-vector product,
    a Gauss-Newton product through a Jacobian-vector product, or any second derivative of a
    model with attention (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, a hand
    written ``F.scaled_dot_product_attention``) raises inside them. The math kernel computes
    the same attention from plain operations, which autodiff can differentiate to any order.
    Inside the context ``torch._weight_norm`` (what ``weight_norm``, the parametrization
    and the older hook, calls) is also computed from plain operations,
    :math:`v\,g/\|v\|`: the derivative of its fused CPU kernel's backward is wrong
    (a Hessian that is not symmetric and disagrees with finite differences of the gradient,
    torch 2.13) and it has no forward-mode rule.
    Every model run of second's operators, per-example gradients, diagonals and Laplace, the
    closures of its Newton-type and diagonal-Hessian optimizers, and the losses that
    :func:`second.hypergradient`, :func:`second.implicit_root` and iMAML differentiate
    already run inside this context; wrap your own forward pass in it when you build the
    graph for :func:`second.hvp` or :func:`second.gvp` yourself, or in the function you give
    :func:`second.minimize`.

    Example:
        >>> layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        >>> x = torch.randn(3, 5, 8)
        >>> with differentiable_attention():
        ...     loss = layer(x).pow(2).mean()
        >>> params = tuple(layer.parameters())
        >>> v = torch.randn(sum(p.numel() for p in params))
        >>> from second import hvp
        >>> bool(torch.isfinite(hvp(loss, params, v)).all())
        True
    """
    with _composite_weight_norm():
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3: no kernel selection; the default is differentiable
            yield
            return
        with sdpa_kernel(SDPBackend.MATH):
            yield


def _weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``torch._weight_norm`` from plain operations (differentiable to any order)."""
    return v * (g / torch.norm_except_dim(v, 2, dim))


@contextlib.contextmanager
def _composite_weight_norm() -> Iterator[None]:
    # the parametrization looks up torch._weight_norm when it runs; the older hook
    # (torch.nn.utils.weight_norm) imported the name into its module
    hook_module = sys.modules.get("torch.nn.utils.weight_norm")
    owners = [o for o in (torch, hook_module) if o is not None and hasattr(o, "_weight_norm")]
    fused = [o._weight_norm for o in owners]
    for o in owners:
        o._weight_norm = _weight_norm
    try:
        yield
    finally:
        for o, f in zip(owners, fused):
            o._weight_norm = f
