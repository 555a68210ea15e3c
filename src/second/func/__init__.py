"""Pure functions: curvature-vector products and exact dense matrices."""

from .dense import exact_fisher, exact_ggn, exact_hessian
from .products import clear_cache, gvp, hvp, jvp, vjp
from .vectors import parameters_to_vector, vector_to_parameters

__all__ = [
    "hvp",
    "gvp",
    "jvp",
    "vjp",
    "exact_hessian",
    "exact_ggn",
    "exact_fisher",
    "parameters_to_vector",
    "vector_to_parameters",
    "clear_cache",
]
