"""Spectral tools: Lanczos eigenpairs, trace and diagonal estimators, spectral density."""

from .estimators import diagonal, spectral_density, trace
from .lanczos import eigsh, extreme_eigenvalues, lanczos

__all__ = ["eigsh", "lanczos", "extreme_eigenvalues", "trace", "diagonal", "spectral_density"]
