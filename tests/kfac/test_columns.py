"""Output-curvature columns: square roots and products of the loss' output Hessian."""

from __future__ import annotations

import torch
from torch import nn

from kfac_cases import DT, EXACT_TOL
from second.kfac import output_hessian_sqrt


def test_output_hessian_sqrt_factorizes_hessian():
    f = torch.randn(2, 4, 3, dtype=DT)  # cross-entropy with one spatial dimension
    loss_fn = nn.CrossEntropyLoss()
    S = output_hessian_sqrt(loss_fn, f, "mean").reshape(12, 2, 12)
    y = torch.randint(0, 4, (2, 3))
    for i in range(2):
        H = torch.autograd.functional.hessian(
            lambda z, i=i: nn.functional.cross_entropy(z.reshape(1, 4, 3), y[i : i + 1]),
            f[i].reshape(-1),
        )
        torch.testing.assert_close(S[:, i].T @ S[:, i], H, **EXACT_TOL[DT])


def test_mc_columns_skip_nonfinite_rows_and_survive_extreme_logits():
    from second.kfac import curvature_columns, nonfinite_rows

    f = torch.randn(4, 3, dtype=DT)
    f[1, 0], f[2, 2] = float("nan"), float("inf")
    f[3] = torch.tensor([1e300, -1e300, 0.0], dtype=DT)  # extreme, finite
    S = curvature_columns(nn.CrossEntropyLoss(), f, None, "mean", "mc", mc_samples=2)
    assert torch.equal(nonfinite_rows(f), torch.tensor([False, True, True, False]))
    assert torch.isfinite(S).all()
    assert not S[:, 1:3].any()  # skipped: zero columns
    # the finite rows: cross-entropy gradients at sampled targets, sqrt(p) scaled, each
    # row summing to 0 (p - onehot)
    torch.testing.assert_close(S[:, [0, 3]].sum(-1), torch.zeros(2, 2, dtype=DT))
    assert S[:, 0].abs().sum() > 0


def test_label_smoothing_keeps_the_output_hessian_and_the_sampled_columns():
    # cross-entropy against smoothed targets q has the Hessian (sum q)(diag p - p p^T): the
    # plain loss'; the Monte-Carlo columns are the likelihood's (hard sampled labels)
    from second.kfac import curvature_columns

    torch.manual_seed(0)
    f, y = torch.randn(5, 4, dtype=DT), torch.randint(0, 4, (5,))
    smooth, plain = nn.CrossEntropyLoss(label_smoothing=0.2), nn.CrossEntropyLoss()
    S = output_hessian_sqrt(smooth, f, "mean")
    for i in range(5):
        H = torch.autograd.functional.hessian(lambda z, i=i: smooth(z[None], y[i : i + 1]), f[i])
        torch.testing.assert_close(S[:, i].T @ S[:, i], H, **EXACT_TOL[DT])

    def mc(loss_fn):
        g = torch.Generator().manual_seed(3)
        return curvature_columns(loss_fn, f, None, "mean", "mc", mc_samples=2, generator=g)

    torch.testing.assert_close(mc(smooth), mc(plain), rtol=0, atol=0)
    # the empirical Fisher's columns are the gradients of the user's (smoothed) loss
    E = curvature_columns(smooth, f, y, "sum", "empirical")[0]
    fr = f.clone().requires_grad_()
    (G,) = torch.autograd.grad(
        nn.functional.cross_entropy(fr, y, label_smoothing=0.2, reduction="sum"), fr
    )
    torch.testing.assert_close(E, G, **EXACT_TOL[DT])
