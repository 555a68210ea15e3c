"""second.spectral.density: stochastic Lanczos quadrature against dense eigenvalues."""

from __future__ import annotations

import pytest
import torch

from second.spectral import spectral_density
from spectra import sym_matrix


def test_spectral_density_is_a_density():
    ev = torch.cat([torch.logspace(-3, 2, 50), -torch.linspace(0.5, 3, 10)])
    A = sym_matrix(ev.tolist(), seed=5)  # indefinite, four decades of magnitude
    grid, density, nodes, weights = spectral_density(A, num_probes=4, lanczos_steps=30)
    assert torch.allclose(weights.sum(1), torch.ones(4, dtype=weights.dtype), atol=1e-10)
    ref = torch.linalg.eigvalsh(A)
    assert (
        float(nodes.min()) >= float(ref[0]) - 1e-8 and float(nodes.max()) <= float(ref[-1]) + 1e-8
    )
    integral = float(torch.trapezoid(density, grid))
    assert integral == pytest.approx(1.0, abs=0.05)
    # SLQ integrates smooth functions: the mean eigenvalue tr(A)/n
    mean_est = float((nodes * weights).sum() / 4)
    assert mean_est == pytest.approx(float(ref.mean()), abs=0.5 * float(ref.std()))


def test_spectral_density_of_a_spectrum_found_in_fewer_steps_has_no_spurious_node():
    # eigenvalues {5, 6}: every probe's Lanczos stops after 2 steps; the padding repeats the
    # last node at weight 0, so the grid and the smoothing width come from the spectrum
    # (they were stretched to 0 by zero nodes: grid [-0.3, 6.3], sigma six times too wide)
    g = torch.Generator().manual_seed(0)
    n = 60
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.full((30,), 5.0), torch.full((30,), 6.0)]).double()
    d = spectral_density(
        Q @ torch.diag(spectrum) @ Q.T, num_probes=3, lanczos_steps=20, return_result=True
    )
    assert float(d.nodes.min()) > 4.99 and float(d.nodes.max()) < 6.01
    assert float(d.grid[0]) > 4.9 and float(d.grid[-1]) < 6.1
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-3
    torch.testing.assert_close(d.weights.sum(1), torch.ones(3, dtype=torch.float64))


def test_spectral_density_standard_error_covers_the_truth():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.logspace(0, -1, 150, dtype=torch.float64)) @ Q.T
    ev = torch.linalg.eigvalsh(A)
    res = spectral_density(A, num_probes=30, lanczos_steps=40, grid=50, return_result=True)
    sigma = 0.01 * float(res.nodes.max() - res.nodes.min())
    true = torch.exp(-0.5 * ((res.grid[:, None] - ev[None]) / sigma) ** 2).sum(1)
    true = true / (len(ev) * sigma * (2 * torch.pi) ** 0.5)
    z = (res.density - true).abs() / res.std_error.clamp_min(1e-12)
    assert float((z < 4).double().mean()) > 0.9
    assert res.matvecs == 30 * 40
