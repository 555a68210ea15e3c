"""Curvature approximations: Kronecker-factored (KFAC) and eigenvalue-corrected (EK-FAC)."""

from .kfac import EKFACInverseOperator, EKFACOperator, KFACInverseOperator, KFACOperator

__all__ = ["KFACOperator", "EKFACOperator", "KFACInverseOperator", "EKFACInverseOperator"]
