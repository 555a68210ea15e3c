"""Attention that second-order autodiff can go through."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
    Every model run of second's operators, per-example gradients, diagonals and Laplace
    already happens inside this context; wrap your own forward pass in it when you build the
    graph for :func:`second.hvp` or :func:`second.gvp` yourself.

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
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel selection; the default is differentiable
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield
