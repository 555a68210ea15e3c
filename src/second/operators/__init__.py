"""Matrix-free curvature operators and their algebra."""

from . import base
from .base import *  # noqa: F403  (the algebra: base.__all__)
from .curvature import CurvatureOperator, FisherOperator, GGNOperator, HessianOperator
from .jacobian import JacobianOperator, TransposedJacobianOperator
from .submatrix import SubmatrixOperator

__all__ = [
    *base.__all__,
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "JacobianOperator",
    "TransposedJacobianOperator",
    "SubmatrixOperator",
]
