"""Curvature through attention: products on models with scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import second
from second import GGNOperator, HessianOperator, eigsh
from second.func import differentiable_attention

TOL = dict(rtol=1e-6, atol=1e-8)  # float64 products against central finite differences (eps 1e-5)


class TinyTransformer(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(3, 8)
        if kind == "encoder":
            self.block = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        elif kind == "mha":
            self.block = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "encoder":
            h = self.block(h)
        elif self.kind == "mha":
            h = self.block(h, h, h, need_weights=False)[0]
        else:  # a hand-written attention through F.scaled_dot_product_attention
            q = k = v = h.view(h.shape[0], h.shape[1], 2, 4).transpose(1, 2)
            h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h.transpose(1, 2).reshape(x.shape[0], x.shape[1], 8)
        return self.out(h).mean(1)


def problem(kind):
    torch.manual_seed(0)
    model = TinyTransformer(kind).double()
    X = torch.randn(6, 5, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    return model, nn.MSELoss(), (X, y)


def dense_hessian(model, loss_fn, X, y, columns, eps=1e-5):
    """Central finite differences of the gradient, column by column (independent of the
    double-backward path the operators use; torch.func.hessian itself is not a reliable
    reference here: on nn.TransformerEncoderLayer it returns a non-symmetric matrix)."""
    params = tuple(model.parameters())
    sizes = [p.numel() for p in params]

    def grad_at(delta):
        with torch.no_grad():
            for p, d in zip(params, torch.split(delta, sizes)):
                p.add_(d.view_as(p))
        with differentiable_attention():
            loss = loss_fn(model(X), y)
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params)])
        with torch.no_grad():
            for p, d in zip(params, torch.split(delta, sizes)):
                p.sub_(d.view_as(p))
        return g

    n = sum(sizes)
    cols = []
    for i in columns:
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = eps
        cols.append((grad_at(e) - grad_at(-e)) / (2 * eps))
    return torch.stack(cols, dim=1)


@pytest.mark.parametrize("kind", ["encoder", "mha", "sdpa"])
def test_hessian_and_ggn_products_through_attention(kind):
    model, loss_fn, (X, y) = problem(kind)
    H = HessianOperator(model, loss_fn, (X, y))
    n = H.shape[0]
    columns = list(range(0, n, 25)) + list(range(n - 60, n))  # every block, all of the norms
    Hd = H.to_dense()
    v = torch.randn(n, dtype=torch.float64)
    torch.testing.assert_close(H @ v, Hd @ v, **TOL)
    torch.testing.assert_close(Hd, Hd.T, **TOL)
    # the reference moves the parameters in place: the operator's kept graphs are stale after
    torch.testing.assert_close(Hd[:, columns], dense_hessian(model, loss_fn, X, y, columns), **TOL)
    H.refresh()
    G = GGNOperator(model, loss_fn, (X, y))
    Gd = G.to_dense()
    torch.testing.assert_close(Gd, Gd.T, **TOL)
    assert float(torch.linalg.eigvalsh(Gd).min()) > -1e-10  # PSD
    vals = eigsh(H, k=2, which="BE", tol=1e-10, return_eigenvectors=False)
    ev = torch.linalg.eigvalsh(Hd)
    torch.testing.assert_close(vals, torch.stack([ev[0], ev[-1]]), rtol=0, atol=1e-6)


def test_user_built_graph_needs_the_context_and_works_inside_it():
    model, loss_fn, (X, y) = problem("encoder")
    params = tuple(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    with differentiable_attention():
        loss = loss_fn(model(X), y)
    hv = second.hvp(loss, params, v)
    torch.testing.assert_close(hv, HessianOperator(model, loss_fn, (X, y)) @ v, **TOL)


def test_influence_on_a_transformer():
    model, loss_fn, (X, y) = problem("encoder")
    inf = second.Influence(model, loss_fn, (X, y), curvature="ggn", damping=1e-3, progressbar=False)
    S = inf.scores((X[:2], y[:2]))
    assert S.shape == (2, 6) and bool(torch.isfinite(S).all())


@pytest.mark.parametrize("style", ["parametrization", "hook"])
def test_weight_norm_hessian_is_symmetric_and_matches_finite_differences(style):
    """The fused weight-norm kernel's double backward is wrong; inside the context (every
    operator's model run) the plain-operation form is used."""
    fused = torch._weight_norm
    torch.manual_seed(0)
    if style == "parametrization":
        layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
    else:
        with pytest.warns(FutureWarning):  # the older hook is deprecated, still supported
            layer = nn.utils.weight_norm(nn.Linear(3, 4))
    model = nn.Sequential(layer, nn.SiLU(), nn.Linear(4, 2)).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    Hd = HessianOperator(model, nn.MSELoss(), (X, y)).to_dense()
    torch.testing.assert_close(Hd, Hd.T, **TOL)
    columns = list(range(Hd.shape[0]))
    torch.testing.assert_close(Hd, dense_hessian(model, nn.MSELoss(), X, y, columns), **TOL)
    assert torch._weight_norm is fused  # restored on leaving the context
