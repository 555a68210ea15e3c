"""Spectral tools: Lanczos eigenpairs, trace and diagonal estimators, spectral density."""

from ._diagonal import ggn_diagonal
from ._eigsh import COPY_CHECK_STEPS, EigshResult, eigsh
from .estimators import Density, Estimate, diagonal, frobenius_norm, spectral_density, trace
from .lanczos import extreme_eigenvalues, lanczos

__all__ = [
    "Density",
    "Estimate",
    "frobenius_norm",
    "ggn_diagonal",
    "eigsh",
    "EigshResult",
    "COPY_CHECK_STEPS",
    "lanczos",
    "extreme_eigenvalues",
    "trace",
    "diagonal",
    "spectral_density",
]
