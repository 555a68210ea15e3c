"""EK-FAC eigen-corrections: the exact block's diagonal in KFAC's eigenbasis."""

from __future__ import annotations

import torch
from torch import nn

from kfac_cases import DT, INVERSE_TOL, dense_ggn, layer_blocks, tanh_net
from second import EKFACOperator
from second.kfac import EigenBlock, LayerRule

ORIENTATION_FAIL = 1e-2  # a transposed eigenbasis must be at least this wrong (relative)


def _orientation_error(
    rules: list[LayerRule], blocks: list[EigenBlock], G: torch.Tensor, model: nn.Module
) -> float:
    """Relative error of the blocks' eigenvalues vs diag(Q^T B Q) of the exact block B."""
    errs = []
    for s, layer, e in zip(layer_blocks(model), rules, blocks):
        d_A = layer.d_A
        # columns of the eigenbasis in parameter ordering: unrotate unit matrices
        E = torch.eye(layer.d_G * d_A, dtype=DT).reshape(-1, layer.d_G, d_A)
        Qcols = e.unrotate(E)  # [d_G*d_A, d_G, d_A]
        vw, vb = layer.from_mat(Qcols)
        Q = torch.cat([vw.reshape(vw.shape[0], -1), vb.reshape(vb.shape[0], -1)], 1).T
        want = (Q.T @ G[s, s] @ Q).diagonal().reshape(layer.d_G, d_A)
        errs.append(float(torch.linalg.norm(e.eigenvalues - want) / torch.linalg.norm(want)))
    return max(errs)


def test_eigenbasis_orientation():
    model, loss_fn = tanh_net(), nn.MSELoss()
    X, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 3, dtype=DT)
    G = dense_ggn(model, loss_fn, X, y)
    E = EKFACOperator(model, loss_fn, (X, y))
    blocks = E.eigen()
    for b, s in zip(blocks, E.scales):
        assert b.eigenvalues is s and not b.kronecker
    assert _orientation_error(E.rules, blocks, G, model) < 1e-10
    # the same check must catch a transposed eigenbasis
    bad = [
        EigenBlock(e.lA, e.QA.T.contiguous(), e.lG, e.QG.T.contiguous(), e.eigenvalues)
        for e in blocks
    ]
    assert _orientation_error(E.rules, bad, G, model) > ORIENTATION_FAIL
    # and the inverse reproduces (B + lam I)^-1 only with the right orientation
    v = torch.randn(E.shape[0], dtype=DT)
    torch.testing.assert_close(E.damped(0.1) @ (E.inverse(damping=0.1) @ v), v, **INVERSE_TOL)


def test_corrections_of_a_weight_used_twice_add_the_calls():
    # a module applied twice: its per-example gradient is the sum over both calls, so the
    # corrections equal diag(Q^T B Q) of the exact block of the shared weight
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(0)
    model, loss_fn = Twice().double(), nn.MSELoss()
    X, y = torch.randn(1, 3, dtype=DT), torch.randn(1, 2, dtype=DT)
    G = dense_ggn(model, loss_fn, X, y)
    E = EKFACOperator(model, loss_fn, (X, y))
    assert _orientation_error(E.rules, E.eigen(), G, model) < 1e-10
