"""Deprecated: the KFAC / EK-FAC operators moved to :mod:`second.kfac`.

``from second.approximations import KFACOperator`` keeps working for one release with a
``DeprecationWarning`` (removal in 0.3); import from ``second`` or ``second.kfac`` instead.
"""

import warnings

from .._errors import SecondDeprecationWarning
from ..kfac import EKFACInverseOperator, EKFACOperator, KFACInverseOperator, KFACOperator

warnings.warn(
    "second.approximations is deprecated and will be removed in 0.3: import KFACOperator, "
    "EKFACOperator and their inverses from second.kfac (or second)",
    SecondDeprecationWarning,
    stacklevel=2,
)

__all__ = ["KFACOperator", "EKFACOperator", "KFACInverseOperator", "EKFACInverseOperator"]
