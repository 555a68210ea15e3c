"""Deprecated: the contents of this module moved to :mod:`second.kfac` (removal in 0.3)."""

from ..kfac import (  # noqa: F401
    FALLBACKS,
    FISHER_TYPES,
    EKFACInverseOperator,
    EKFACOperator,
    KFACInverseOperator,
    KFACOperator,
    add_layer_statistics,
    backprop_columns,
    batch_statistics,
    curvature_columns,
    find_layers,
    output_hessian_product,
    output_hessian_sqrt,
)

__all__ = ["KFACOperator", "EKFACOperator", "KFACInverseOperator", "EKFACInverseOperator"]
