"""Factor statistics: sums plus counts merge by addition; running averages."""

from __future__ import annotations

import torch
from torch import nn

from kfac_cases import DT, Scaled, tanh_net
from second.kfac import (
    Capture,
    FactorStats,
    add_layer_statistics,
    batch_statistics,
    curvature_columns,
    find_layers,
)


def _stats(model, loss_fn, batches, lazy=False, fallback=()):
    layers = find_layers(model)
    stats = FactorStats(layers, list(fallback), lazy=lazy)
    for X, y in batches:
        with Capture(layers) as cap:
            out = model(X)
        S = curvature_columns(loss_fn, out, y, "sum", "type2")
        batch_statistics(layers, list(fallback), out, S, cap, stats, retain_graph=False)
    stats.tensors()
    return stats


def test_sums_and_counts_add_over_batches():
    model, loss_fn = tanh_net(), nn.MSELoss(reduction="sum")
    X, y = torch.randn(10, 4, dtype=DT), torch.randn(10, 3, dtype=DT)
    whole = _stats(model, loss_fn, [(X, y)])
    parts = _stats(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])])
    lazy = _stats(model, loss_fn, [(X[:4], y[:4]), (X[4:], y[4:])], lazy=True)
    assert whole.n == parts.n == lazy.n == 10
    for st in (parts, lazy):
        assert st.nA == whole.nA == [10.0, 10.0, 10.0]
        for a, b in zip(st.A + st.G, whole.A + whole.G):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # the input factor is a plain mean of outer products of the inputs (bias column 1)
    a = torch.cat([X, torch.ones(10, 1, dtype=DT)], 1)
    torch.testing.assert_close(whole.A[0] / whole.nA[0], a.T @ a / 10, rtol=1e-12, atol=1e-12)


def test_padding_positions_are_dropped():
    emb = nn.Embedding(4, 2, padding_idx=0).double()
    (layer,) = find_layers(emb)
    st = FactorStats([layer], [])
    idx = torch.tensor([[0, 1, 1], [2, 0, 3]])
    g = torch.ones(1, 2, 3, 2, dtype=DT)
    add_layer_statistics(st, 0, layer, idx, g)
    assert st.nA[0] == 4.0  # 6 positions, 2 of them padding
    torch.testing.assert_close(st.A[0], torch.tensor([0.0, 2.0, 1.0, 1.0], dtype=DT))
    torch.testing.assert_close(st.G[0], torch.full((2, 2), 4.0, dtype=DT))


def test_ema_is_the_running_average():
    model, loss_fn = tanh_net(), nn.MSELoss(reduction="sum")
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    beta, w = 0.9, 1.0 / 6
    layers = find_layers(model)
    ref = _stats(model, loss_fn, [(X, y)])
    for lazy in (False, True):  # lazy: rows still pending, folded in with one addmm each
        st = FactorStats(layers, [], lazy=lazy)
        with Capture(layers) as cap:
            out = model(X)
        S = curvature_columns(loss_fn, out, y, "sum", "type2")
        batch_statistics(layers, [], out, S, cap, st)
        assert all(st.rows) == lazy
        A0 = [torch.eye(layer.d_A, dtype=DT) for layer in layers]
        G0 = [torch.eye(layer.d_G, dtype=DT) for layer in layers]
        A_run, G_run = [a.clone() for a in A0], [g.clone() for g in G0]
        A_run, G_run, _ = st.ema(A_run, G_run, [], beta, w)
        for j in range(len(layers)):
            want_A = beta * A0[j] + (1 - beta) * ref.A[j] / ref.nA[j]
            want_G = beta * G0[j] + (1 - beta) * w * ref.G[j]
            torch.testing.assert_close(A_run[j], want_A, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(G_run[j], want_G, rtol=1e-12, atol=1e-12)


def test_fallback_diagonal_is_exact_with_one_datum():
    model = Scaled().double()
    X, y = torch.randn(1, 4, dtype=DT), torch.randn(1, 3, dtype=DT)
    st = _stats(model, nn.MSELoss(reduction="sum"), [(X, y)], fallback=[model.scale])
    z = model.lin(X).detach()[0]
    torch.testing.assert_close(st.diag[0], 2 * z * z)  # d^2/ds^2 of sum (z s - y)^2


def test_fallback_diagonal_shares_the_factor_backward():
    """The Rademacher signs of the fallback diagonal leave the layers' factors as they are
    (one backward for both), and the diagonal is exact with one datum beside them."""
    model = Scaled().double()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    loss_fn = nn.MSELoss(reduction="sum")
    plain = _stats(model, loss_fn, [(X, y)])
    signed = _stats(model, loss_fn, [(X, y)], fallback=[model.scale])
    assert signed.diag[0] is not None
    for a, b in zip(signed.A + signed.G, plain.A + plain.G):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    one = _stats(model, loss_fn, [(X[:1], y[:1])], fallback=[model.scale])
    z = model.lin(X[:1]).detach()[0]
    torch.testing.assert_close(one.diag[0], 2 * z * z)
