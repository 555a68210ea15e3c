"""Shared fixtures and the tolerance tables every test reads from."""

from __future__ import annotations

import pytest
import torch

# Tolerances, by dtype. Loosening one is a visible, commented change.
PRODUCT_TOL = {  # curvature products vs a torch.func dense reference
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}
SOLVE_TOL = {  # relative error of an iterative solve vs a dense float64 solve
    torch.float64: 1e-8,
    torch.float32: 1e-3,
}

DTYPES = [torch.float64, torch.float32]

# The test problems are tiny: intra-op threads only add synchronization, and on a
# busy machine their spin-waiting makes a backward pass through a small Conv2d 100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
