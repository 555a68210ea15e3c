"""Newton core preconditioners against dense float64 inverses."""

from __future__ import annotations

import torch

from second.newton import LBFGSPreconditioner, diagonal_preconditioner

DT = torch.float64


def test_lbfgs_preconditioner_is_exact_after_n_conjugate_pairs():
    # coordinate steps are A-conjugate for a diagonal A: BFGS's hereditary property then
    # makes the n-pair approximation exact
    g = torch.Generator().manual_seed(0)
    A = torch.diag(torch.tensor([1.0, 3.0, 10.0, 100.0, 1e4], dtype=DT))
    M = LBFGSPreconditioner(memory=5)
    for s in torch.eye(5, dtype=DT):
        assert M.update(s, A @ s)
    r = torch.randn(5, generator=g, dtype=DT)
    # BFGS with n linearly independent exact pairs recovers A^{-1} (quasi-Newton condition)
    for s in torch.eye(5, dtype=DT):
        torch.testing.assert_close(M(A @ s), s, rtol=1e-8, atol=1e-10)
    assert float(r @ M(r)) > 0


def test_lbfgs_preconditioner_skips_pairs_without_positive_curvature():
    M = LBFGSPreconditioner()
    s = torch.tensor([1.0, 0.0], dtype=DT)
    assert not M.update(s, -s) and len(M) == 0
    r = torch.tensor([1.0, 2.0], dtype=DT)
    torch.testing.assert_close(M(r), r)


def test_diagonal_preconditioner_floors_small_entries():
    M = diagonal_preconditioner(torch.tensor([4.0, -2.0, 0.0], dtype=DT), floor=0.25)
    torch.testing.assert_close(M(torch.ones(3, dtype=DT)), torch.tensor([0.25, 0.5, 1.0], dtype=DT))


def test_lbfgs_preconditioner_follows_its_newest_pair():
    """The initial scaling s^T y / y^T y is the newest pair's, also once the memory is full."""
    g = torch.Generator().manual_seed(0)
    M = LBFGSPreconditioner(memory=2)
    r = torch.randn(4, generator=g, dtype=DT)
    for k in range(4):
        s = torch.randn(4, generator=g, dtype=DT)
        assert M.update(s, (k + 1.0) * s)  # H = (k + 1) I along s
        q = M(r)
        # the two-loop recursion written out for the pairs it holds
        ref, alphas = r.clone(), []
        for s_i, y_i, rho in reversed(M.pairs):
            alphas.append(rho * float(s_i @ ref))
            ref = ref - alphas[-1] * y_i
        s_n, y_n, rho_n = M.pairs[-1]
        ref = ref * float(s_n @ y_n) / float(y_n @ y_n)
        for (s_i, y_i, rho), a in zip(M.pairs, reversed(alphas)):
            ref = ref + (a - rho * float(y_i @ ref)) * s_i
        torch.testing.assert_close(q, ref, rtol=1e-12, atol=1e-14)
