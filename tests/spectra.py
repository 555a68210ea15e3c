"""Matrices with chosen spectra and the tolerance table the solver tests share."""

from __future__ import annotations

import torch

# Tolerances of the solver tests (see conftest for the shared tables).
SEED_MINRES_F64_RELERR = 1e-8  # issue target: <= 1e-8 within 4 n products
SEED_AUTO_F64_RELERR = 1e-10  # issue target
SEED_F32_COSINE = 0.999  # issue target for float32 products
NEUMANN_RELERR = 1e-3  # issue target for automatic scale on a damped PSD matrix
LISSA_RELERR = 6e-2  # stochastic: 4 very different rank-8 batches, 100 repeats; ~1/sqrt(repeats)


def sym_matrix(eigenvalues, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ Q.T
    return (0.5 * (A + A.T)).to(dtype)


def rhs(n, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64).to(dtype)


SPECTRA = {
    "spd_well": torch.linspace(1.0, 10.0, 40).tolist(),
    "spd_ill": torch.logspace(-4, 2, 40).tolist(),
    "indefinite": torch.cat([-torch.logspace(-2, 1, 15), torch.logspace(-2, 1, 25)]).tolist(),
}


def exact(A, b):
    return torch.linalg.solve(A.double(), b.double())
