"""Pure functions: curvature-vector products, exact dense matrices, flat <-> parameter views.

The one owner of autodiff in ``second``: the operators, influence, implicit differentiation
and the optimizers take their products from here (:class:`JacobianGraph` and
:class:`GGNGraph` keep the graphs a product needs; :func:`hvp_from_gradient` multiplies
through a gradient built with ``create_graph=True``).
"""

from .attention import differentiable_attention
from .dense import dense_from_matmat, eigenvalue_cutoff, exact_fisher, exact_ggn, exact_hessian
from .per_example import (
    ModelFunction,
    call_model,
    map_examples,
    per_example_gradients,
    per_example_jacobians,
)
from .products import (
    GGNGraph,
    JacobianGraph,
    clear_cache,
    gradient_with_graph,
    gvp,
    hessian_matvec,
    hvp,
    hvp_from_gradient,
    jvp,
    vjp,
)
from .vectors import (
    add_vector_to_parameters,
    columns_to_parameters,
    parameters_to_columns,
    parameters_to_vector,
    vector_to_parameters,
)

__all__ = [
    "hvp",
    "differentiable_attention",
    "gvp",
    "jvp",
    "vjp",
    "exact_hessian",
    "exact_ggn",
    "exact_fisher",
    "dense_from_matmat",
    "eigenvalue_cutoff",
    "parameters_to_vector",
    "vector_to_parameters",
    "add_vector_to_parameters",
    "columns_to_parameters",
    "parameters_to_columns",
    "JacobianGraph",
    "GGNGraph",
    "gradient_with_graph",
    "hvp_from_gradient",
    "hessian_matvec",
    "ModelFunction",
    "per_example_gradients",
    "map_examples",
    "call_model",
    "per_example_jacobians",
    "clear_cache",
]
