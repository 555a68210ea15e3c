"""Implicit gradients of losses that use scaled-dot-product attention.

The fused attention kernels have no double backward; hypergradient, implicit_root and
iMAML's meta_gradient differentiate the user's loss twice, so they call it inside
``differentiable_attention`` (the math kernel). Checked against the same computation with a
loss that selects the math kernel itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from second import hypergradient
from second.func import differentiable_attention
from second.implicit.imaml import meta_gradient

SAME = dict(rtol=1e-10, atol=1e-12)  # float64, the same computation two ways


def _attention_loss(w, x, y):
    """A one-layer attention regression: queries and keys from ``x @ w``."""
    q = (x @ w)[None, None]  # [batch 1, heads 1, positions, features]: the fused kernels' form
    out = F.scaled_dot_product_attention(q, q, q)[0, 0].sum(-1)
    return ((out - y) ** 2).mean()


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)
    return w, x, y


def test_hypergradient_through_attention():
    w, x, y = _data()
    lam = torch.tensor(0.5, dtype=torch.float64)

    def inner(params, hp, math=False):
        with differentiable_attention() if math else torch.enable_grad():
            return _attention_loss(params, x, y) + hp * (params**2).sum()

    def outer(params, hp):
        return (params**2).sum()

    kw = dict(method="dense", inner_tol=None)
    got = hypergradient(inner, outer, w, lam, **kw)
    want = hypergradient(lambda p, h: inner(p, h, math=True), outer, w, lam, **kw)
    torch.testing.assert_close(got.grad, want.grad, **SAME)
    assert bool(torch.isfinite(got.grad).all())


def test_meta_gradient_through_attention():
    w, x, y = _data()

    def task(params, math=False):
        with differentiable_attention() if math else torch.enable_grad():
            return _attention_loss(params, x, y)

    def test(params):
        return _attention_loss(params, x + 0.1, y)

    got = meta_gradient(task, test, w, 2.0, method="dense")
    want = meta_gradient(lambda p: task(p, math=True), test, w, 2.0, method="dense")
    torch.testing.assert_close(got.grad, want.grad, **SAME)
