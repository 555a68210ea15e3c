"""second.solvers: dense against dense float64 solves on matrices with chosen spectra."""

from __future__ import annotations

import pytest
import torch

from second import (
    ConvergenceWarning,
    dense,
    relative_error,
)
from spectra import rhs, sym_matrix


def test_dense_singular_consistent_and_inconsistent():
    A = sym_matrix([0.0, 0.0, 1.0, 2.0, -3.0])
    b = A @ rhs(5)
    res = dense(A, b)
    assert res.converged and res.info["rank"] == 3
    assert relative_error(res.x, torch.linalg.pinv(A) @ b) < 1e-10
    evals, evecs = torch.linalg.eigh(A)
    e = evecs[:, evals.abs().argmin()]  # a null vector
    with pytest.warns(ConvergenceWarning, match="inconsistent"):
        res = dense(A, b + e)
    assert not res.converged
