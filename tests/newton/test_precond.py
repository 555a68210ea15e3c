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


def _two_loop_reference(pairs, r):
    """The two-loop recursion in float64, written out (the definition of L-BFGS's M r)."""
    q, alphas = r.double().clone(), []
    for s, y in reversed(pairs):
        a = float(s @ q) / float(s @ y)
        alphas.append(a)
        q = q - a * y
    s, y = pairs[-1]
    q = q * float(s @ y) / float(y @ y)
    for (s, y), a in zip(pairs, reversed(alphas)):
        q = q + (a - float(y @ q) / float(s @ y)) * s
    return q


def test_lbfgs_compact_form_is_the_two_loop_recursion():
    # pairs from gradient descent on an ill-conditioned quadratic (condition 1e6), more pairs
    # than the memory, float64 and float32; and the recursion itself (the fallback)
    g = torch.Generator().manual_seed(0)
    n = 30
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.logspace(0, 6, n, dtype=DT)) @ Q.T
    x = torch.randn(n, generator=g, dtype=DT)
    pairs = []
    for _ in range(14):
        s = -(A @ x) / 1e6
        pairs.append((s, A @ s))
        x = x + s
    r = torch.randn(n, generator=g, dtype=DT)
    for dtype, tol in ((DT, 1e-9), (torch.float32, 1e-5)):
        M = LBFGSPreconditioner(memory=8)
        for s, y in pairs:
            assert M.update(s.to(dtype), y.to(dtype))
        kept = [(s.to(dtype).double(), y.to(dtype).double()) for s, y in pairs[-8:]]
        want = _two_loop_reference(kept, r)
        torch.testing.assert_close(
            M(r.to(dtype)).double(), want, rtol=tol, atol=tol * float(want.norm())
        )
        torch.testing.assert_close(
            M._two_loop(r.to(dtype)).double(), want, rtol=tol, atol=tol * float(want.norm())
        )


def test_diagonal_preconditioner_floors_small_entries():
    M = diagonal_preconditioner(torch.tensor([4.0, -2.0, 0.0], dtype=DT), floor=0.25)
    torch.testing.assert_close(M(torch.ones(3, dtype=DT)), torch.tensor([0.25, 0.5, 1.0], dtype=DT))
