"""Spectral densities by stochastic Lanczos quadrature."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from .._progress import progress
from ..operators.base import aslinearoperator
from .estimators import _gen, _sem
from .lanczos import _lanczos, tridiagonal

__all__ = ["spectral_density", "Density"]


@dataclass
class Density:
    """A spectral density by stochastic Lanczos quadrature, with its standard error.

    Attributes:
        grid: where the density is evaluated.
        density: the smoothed density on ``grid``.
        std_error: its pointwise standard error over the probes.
        nodes: Ritz values, ``[num_probes, steps]``.
        weights: their quadrature weights (each probe's sum to 1).
        matvecs: operator products used.

    Example:
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 60, dtype=torch.float64))
        >>> d = spectral_density(A, num_probes=4, lanczos_steps=20, return_result=True)
        >>> d.density.shape == d.std_error.shape, d.matvecs
        (True, 80)
    """

    grid: Tensor
    density: Tensor
    std_error: Tensor
    nodes: Tensor
    weights: Tensor
    matvecs: int


@overload
def spectral_density(
    A,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | int = 200,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    return_result: Literal[False] = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...


@overload
def spectral_density(
    A,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | int = 200,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    return_result: Literal[True],
) -> Density: ...


def spectral_density(
    A,
    *,
    num_probes: int = 10,
    lanczos_steps: int = 80,
    grid: Tensor | int = 200,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    return_result: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor] | Density:
    r"""Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    For each Gaussian probe :math:`z`, ``lanczos_steps`` Lanczos iterations give nodes
    :math:`\theta_j` (Ritz values) and weights :math:`\tau_j^2` (squared first components
    of the Ritz vectors); averaged over probes they approximate the spectral measure
    :math:`\frac1n \sum_i \delta(\lambda - \lambda_i)`, whose integrals of smooth functions
    converge fast. The density on ``grid`` is the measure smoothed by a Gaussian of
    width ``sigma`` (default 1% of the spectral range).

    Args:
        A: a symmetric :class:`~second.LinearOperator`, dense tensor or SciPy operator.
        num_probes: Gaussian starting vectors.
        lanczos_steps: Lanczos steps (products) per probe.
        grid: the points where the density is evaluated, or their number.
        sigma: the width of the Gaussian smoothing.
        generator: the random generator of the probes. Default: a fresh one seeded from
            torch's global generator (``torch.manual_seed`` makes the density reproducible);
            for a curvature operator summed over a ``torch.distributed`` group, rank 0's
            seed on every rank.
        return_result: return a :class:`Density`.

    Returns:
        ``(grid, density, nodes, weights)``; ``nodes``/``weights`` are
        ``[num_probes, steps]`` (weights of each probe sum to 1; a probe that found an
        invariant subspace in fewer steps repeats its last node at weight 0). With
        ``return_result=True``
        a :class:`Density` that adds the pointwise standard error of the density (from the
        spread of the probes' densities; NaN from a single probe) and the products used.

    Raises:
        ValueError: an operator that declares itself nonsymmetric, or one that is clearly not
            symmetric (a probe at every Lanczos step, from the products it takes anyway).

    Example:
        >>> A = torch.diag(torch.linspace(-1.0, 1.0, 100, dtype=torch.float64))
        >>> grid, density, nodes, weights = spectral_density(A, num_probes=4, lanczos_steps=30)
        >>> abs(float(torch.trapezoid(density, grid)) - 1.0) < 0.05     # a probability density
        True
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    g = _gen(generator, op)
    start = op.matvecs
    all_nodes, all_weights = [], []
    for _ in progress(range(num_probes), desc="spectral_density", unit="probe"):
        z = torch.randn(n, generator=g, dtype=op.dtype, device=op.device)
        alpha, beta, _ = _lanczos(op, z, lanczos_steps, check="spectral_density")
        theta, S = torch.linalg.eigh(tridiagonal(alpha, beta))
        m = min(lanczos_steps, n)
        pad = m - theta.numel()
        w = S[0] ** 2
        # a probe whose Lanczos stopped early (an invariant subspace) is padded with copies
        # of its last node at weight 0: no spurious node at 0 in the nodes, range or sigma
        all_nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
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
    per_probe = (kern * weights.unsqueeze(0)).sum(dim=2)  # [grid, probes]
    density = per_probe.mean(dim=1)
    if not return_result:
        return grid, density, nodes, weights
    return Density(grid, density, _sem(per_probe.T), nodes, weights, op.matvecs - start)
