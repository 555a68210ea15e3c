"""sym_eigh: eigendecomposition of a factor, clamped, with the float64 retry."""

from __future__ import annotations

import pytest
import torch

import second.kfac.eigen as eigen_module
from second import NonFiniteError
from second.kfac import sym_eigh


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_reconstructs_a_psd_matrix(dtype):
    B = torch.randn(6, 4, dtype=torch.float64)
    M = (B @ B.T).to(dtype)  # rank 4: two zero eigenvalues
    lam, Q = sym_eigh(M)
    assert lam.dtype == Q.dtype == dtype and Q.is_contiguous()
    assert bool((lam >= 0).all())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close((Q * lam) @ Q.T, M, rtol=tol, atol=tol * float(M.abs().max()))


def test_negative_rounding_eigenvalues_are_clamped():
    lam, _ = sym_eigh(torch.diag(torch.tensor([-1e-12, 3.0], dtype=torch.float64)))
    assert lam.tolist() == [0.0, 3.0]


def test_non_finite_factor_raises():
    with pytest.raises(NonFiniteError):
        sym_eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_lapack_failure_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(M):
        calls.append(M.dtype)
        if M.dtype != torch.float64:
            raise RuntimeError("linalg.eigh: the algorithm failed to converge")
        return real(M)

    monkeypatch.setattr(eigen_module.torch.linalg, "eigh", flaky)
    M = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    lam, Q = sym_eigh(M)
    assert calls == [torch.float32, torch.float64]
    assert lam.dtype == torch.float32
    torch.testing.assert_close(lam, torch.tensor([1.0, 3.0]))


def test_second_failure_retries_with_a_shift(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(M):
        calls.append(M.dtype)
        if len(calls) < 3:
            raise RuntimeError("linalg.eigh: the algorithm failed to converge")
        return real(M)

    monkeypatch.setattr(eigen_module.torch.linalg, "eigh", flaky)
    M = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    lam, _ = sym_eigh(M)
    assert len(calls) == 3
    torch.testing.assert_close(lam, torch.tensor([1.0, 3.0], dtype=torch.float64))
