"""Randomized trace and diagonal estimators and stochastic Lanczos quadrature."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..operators.base import aslinearoperator
from .lanczos import lanczos, tridiagonal

__all__ = ["trace", "diagonal", "spectral_density"]


def _rademacher(n: int, k: int, g: torch.Generator, dtype, device) -> Tensor:
    return torch.randint(0, 2, (n, k), generator=g, device=device).to(dtype) * 2 - 1


def _gen(generator, device) -> torch.Generator:
    return generator or torch.Generator(device=device).manual_seed(0)


def trace(
    A,
    num_matvecs: int = 100,
    method: str = "hutch++",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{tr}(A)` from about ``num_matvecs`` products.

    * ``"hutchinson"``: :math:`\frac1m \sum_i z_i^\top A z_i` with Rademacher :math:`z_i`;
      unbiased, error :math:`O(\|A\|_F/\sqrt m)`.
    * ``"hutch++"`` (default; Meyer et al., 2021): a third of the budget finds the
      dominant range :math:`Q` of :math:`A S`, whose trace is taken exactly, and Hutchinson
      handles the rest; error :math:`O(1/m)` for matrices with decaying spectra.
    * ``"exact"``: the sum of :math:`e_i^\top A e_i` over all ``n`` unit vectors (batched).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> float(trace(A, method="exact"))
        15.0
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    g = _gen(generator, op.device)
    if method == "exact":
        return torch.diagonal(op.to_dense()).sum()
    if num_matvecs < 1:
        raise ValueError("num_matvecs must be >= 1")
    if method == "hutchinson":
        Z = _rademacher(n, num_matvecs, g, op.dtype, op.device)
        return (Z * (op @ Z)).sum() / num_matvecs
    if method == "hutch++":
        k = max(1, num_matvecs // 3)
        if 2 * k >= n:  # the budget covers the whole space: take the trace exactly
            return torch.diagonal(op.to_dense()).sum()
        S = _rademacher(n, k, g, op.dtype, op.device)
        Q, _ = torch.linalg.qr(op @ S)
        G = _rademacher(n, max(1, num_matvecs - 2 * k), g, op.dtype, op.device)
        G = G - Q @ (Q.T @ G)
        return torch.trace(Q.T @ (op @ Q)) + (G * (op @ G)).sum() / G.shape[1]
    raise ValueError(f"method must be 'hutch++', 'hutchinson' or 'exact', got {method!r}")


def diagonal(
    A,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Estimate :math:`\mathrm{diag}(A)`.

    * ``"hutchinson"``: :math:`\frac1m \sum_i z_i \odot A z_i` (Bekas et al., 2007),
      Rademacher probes; unbiased, error per entry :math:`O(\|A_{i,:}\|/\sqrt m)`.
    * ``"exact"``: from ``n`` batched unit-vector products (small models).

    Raises:
        ValueError: an unknown ``method``, or ``num_matvecs < 1`` for ``"hutchinson"``.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> diagonal(A, method="exact")
        tensor([2., 3.], dtype=torch.float64)
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    if method == "exact":
        return torch.diagonal(op.to_dense()).clone()
    if method != "hutchinson":
        raise ValueError(f"method must be 'hutchinson' or 'exact', got {method!r}")
    if num_matvecs < 1:
        raise ValueError("num_matvecs must be >= 1")
    g = _gen(generator, op.device)
    Z = _rademacher(n, num_matvecs, g, op.dtype, op.device)
    return (Z * (op @ Z)).mean(dim=1)


def spectral_density(
    A,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | int = 200,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    For each Gaussian probe :math:`z`, ``lanczos_steps`` Lanczos iterations give nodes
    :math:`\theta_j` (Ritz values) and weights :math:`\tau_j^2` (squared first components
    of the Ritz vectors); averaged over probes they approximate the spectral measure
    :math:`\frac1n \sum_i \delta(\lambda - \lambda_i)`, whose integrals of smooth functions
    converge fast. The density on ``grid`` is the measure smoothed by a Gaussian of
    width ``sigma`` (default 1% of the spectral range).

    Returns:
        ``(grid, density, nodes, weights)``; ``nodes``/``weights`` are
        ``[num_probes, steps]`` (weights of each probe sum to 1).

    Example:
        >>> A = torch.diag(torch.linspace(-1.0, 1.0, 100, dtype=torch.float64))
        >>> grid, density, nodes, weights = spectral_density(A, num_probes=4, lanczos_steps=30)
        >>> abs(float(torch.trapezoid(density, grid)) - 1.0) < 0.05     # a probability density
        True
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    g = _gen(generator, op.device)
    all_nodes, all_weights = [], []
    for _ in range(num_probes):
        z = torch.randn(n, generator=g, dtype=op.dtype, device=op.device)
        alpha, beta, _ = lanczos(op, z, lanczos_steps)
        theta, S = torch.linalg.eigh(tridiagonal(alpha, beta))
        m = min(lanczos_steps, n)
        pad = m - theta.numel()
        w = S[0] ** 2
        all_nodes.append(torch.cat([theta, theta.new_zeros(pad)]))
        all_weights.append(torch.cat([w, w.new_zeros(pad)]))
    nodes = torch.stack(all_nodes)
    weights = torch.stack(all_weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    span = max(hi - lo, 1e-12)
    if isinstance(grid, int):
        grid = torch.linspace(lo - 0.05 * span, hi + 0.05 * span, grid, dtype=torch.float64)
    sigma = sigma or 0.01 * span
    diff = grid.reshape(-1, 1, 1) - nodes.unsqueeze(0)
    kern = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (kern * weights.unsqueeze(0)).sum(dim=(1, 2)) / num_probes
    return grid, density, nodes, weights
