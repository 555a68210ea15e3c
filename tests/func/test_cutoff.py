"""The one pseudo-inverse policy (second.func.eigenvalue_cutoff) and rectangular dense assembly."""

from __future__ import annotations

import pytest
import torch

from second.func import dense_from_matmat, eigenvalue_cutoff
from second.solvers import dense

EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def test_cutoff_follows_the_glossary_rule():
    lam = torch.tensor([4.0, -2.0, 1e-20], dtype=torch.float64)
    assert eigenvalue_cutoff(lam) == pytest.approx(3 * EPS64 * 4.0)
    # a matrix computed in float32 carries float32 rounding, whatever the eigh dtype
    assert eigenvalue_cutoff(lam, dtype=torch.float32) == pytest.approx(EPS32 * 4.0)
    # n large enough that n eps(float64) exceeds eps(float32)
    n = 2 * int(EPS32 / EPS64)
    assert eigenvalue_cutoff(lam, n=n, dtype=torch.float32) == pytest.approx(n * EPS64 * 4.0)
    assert eigenvalue_cutoff(lam, rcond=0.1) == pytest.approx(0.4)
    assert eigenvalue_cutoff(torch.zeros(0)) == 0.0
    assert eigenvalue_cutoff(lam.to(torch.complex128)) == pytest.approx(3 * EPS64 * 4.0)
    with pytest.raises(ValueError, match="rcond"):
        eigenvalue_cutoff(lam, rcond=-1.0)


def test_dense_solver_uses_the_shared_cutoff():
    """A singular PSD matrix: the dense solve is the pseudo-inverse with the shared cutoff."""
    U = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    lam = torch.tensor([3.0, 2.0, 1.0, 1e-3, 1e-17, 0.0], dtype=torch.float64)
    A = U @ torch.diag(lam) @ U.T
    b = U[:, :4] @ torch.ones(4, dtype=torch.float64)  # in the range
    res = dense(A, b, tol=1e-8)
    keep = lam.abs() > eigenvalue_cutoff(torch.linalg.eigvalsh(A))
    assert int(keep.sum()) == 4 == res.info["rank"]
    pinv = U @ torch.diag(torch.where(keep, 1.0 / lam, torch.zeros_like(lam))) @ U.T
    torch.testing.assert_close(res.x, pinv @ b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_dense_from_matmat_assembles_rectangular_matrices(chunk_size):
    A = torch.randn(3, 5, dtype=torch.float64)
    got = dense_from_matmat(
        lambda E: A @ E,
        lambda e: A @ e,
        (3, 5),
        dtype=A.dtype,
        device=A.device,
        chunk_size=chunk_size,
    )
    torch.testing.assert_close(got, A, rtol=0, atol=0)
    S = A @ A.T
    square = dense_from_matmat(lambda E: S @ E, None, 3, dtype=S.dtype, device=S.device)
    torch.testing.assert_close(square, S, rtol=0, atol=0)


def test_dense_from_matmat_falls_back_to_columns_when_batching_fails():
    A = torch.randn(2, 3, dtype=torch.float64)

    def matmat(E):
        raise RuntimeError("vmap: batching rule not implemented")

    with pytest.warns(UserWarning, match="column by column"):
        got = dense_from_matmat(matmat, lambda e: A @ e, (2, 3), dtype=A.dtype, device=A.device)
    torch.testing.assert_close(got, A, rtol=0, atol=0)
