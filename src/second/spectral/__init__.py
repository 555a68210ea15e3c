"""Spectral tools: Lanczos eigenpairs, trace and diagonal estimators, spectral density."""

from ._diagonal import ggn_diagonal
from ._eigsh import COPY_CHECK_STEPS, EigshResult, eigsh
from .density import Density, spectral_density
from .estimators import Estimate, diagonal, frobenius_norm, trace
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
