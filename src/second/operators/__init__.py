"""Matrix-free curvature operators and their algebra."""

from .base import (
    CallableOperator,
    DampedOperator,
    DenseOperator,
    IdentityOperator,
    LinearOperator,
    ScaledOperator,
    SumOperator,
    aslinearoperator,
)
from .curvature import CurvatureOperator, FisherOperator, GGNOperator, HessianOperator
from .jacobian import JacobianOperator, TransposedJacobianOperator
from .submatrix import SubmatrixOperator

__all__ = [
    "LinearOperator",
    "DenseOperator",
    "CallableOperator",
    "IdentityOperator",
    "SumOperator",
    "ScaledOperator",
    "DampedOperator",
    "aslinearoperator",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "JacobianOperator",
    "TransposedJacobianOperator",
    "SubmatrixOperator",
]
