"""Deprecated: the KFAC / EK-FAC operators moved to :mod:`second.kfac`.

``from second.approximations import KFACOperator`` keeps working for one release with a
``SecondDeprecationWarning`` (removal in 0.3); import from ``second`` or ``second.kfac``
instead.
"""

from .._deprecation import warn_deprecated
from ..kfac import EKFACInverseOperator, EKFACOperator, KFACInverseOperator, KFACOperator

# at the importing line (the default stacklevel: warnings skips the import machinery)
warn_deprecated(
    "second.approximations",
    "second.kfac or second",
    detail="import KFACOperator, EKFACOperator and their inverses from there",
)

__all__ = ["KFACOperator", "EKFACOperator", "KFACInverseOperator", "EKFACInverseOperator"]
