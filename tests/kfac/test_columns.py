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
