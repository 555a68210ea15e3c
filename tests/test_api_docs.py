"""Every public name is documented; public functions and estimators show a runnable example.

The examples themselves run in ``test_doctests.py``.
"""

from __future__ import annotations

import importlib
import inspect
import warnings

import pytest

from second._errors import SecondDeprecationWarning

PUBLIC_MODULES = [
    "second",
    "second.func",
    "second.operators",
    "second.solvers",
    "second.spectral",
    "second.approximations",
    "second.kfac",
    "second.optim",
    "second.influence",
    "second.implicit",
    "second.laplace",
]

# Names whose docstring need not carry an example: result records, exceptions, registries and
# building blocks documented through the function that returns them.
NO_EXAMPLE_NEEDED = {
    "SolveResult",
    "LissaRecursion",
    "OptimizeResult",
    "SubproblemResult",
    "HypergradientResult",
    "PriorOptimizationResult",
    "TopK",
    "ConvergenceWarning",
    "NegativeCurvatureWarning",
    "NonFiniteError",
    "NonDeterministicDataError",
    "METHODS",
    "choose_method",
    "clear_cache",
    "LowRankInverse",
    "lowrank_inverse",
    "lanczos",
    "extreme_eigenvalues",
    "KFACInverseOperator",
    "EKFACInverseOperator",
    "CurvatureOperator",
    "CallableOperator",
    "IdentityOperator",
    "SumOperator",
    "ScaledOperator",
    "DenseOperator",
}


def _import(mname: str):
    with warnings.catch_warnings():  # second.approximations is deprecated, and still public
        warnings.simplefilter("ignore", SecondDeprecationWarning)
        return importlib.import_module(mname)


def _public():
    seen = {}
    for mname in PUBLIC_MODULES:
        module = _import(mname)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if not inspect.ismodule(obj):
                seen.setdefault(name, obj)
    return sorted(seen.items())


DOCUMENTED = [(n, o) for n, o in _public() if not isinstance(o, dict)]
REGISTRIES = [(n, o) for n, o in _public() if isinstance(o, dict)]


@pytest.mark.parametrize(("name", "obj"), DOCUMENTED, ids=[n for n, _ in DOCUMENTED])
def test_public_name_is_documented(name, obj):
    doc = inspect.getdoc(obj)
    assert doc and len(doc.split()) >= 5, f"{name} has no real docstring"
    if name not in NO_EXAMPLE_NEEDED:
        assert ">>>" in doc, f"{name}'s docstring has no runnable example"


@pytest.mark.parametrize(("name", "registry"), REGISTRIES, ids=[n for n, _ in REGISTRIES])
def test_public_registries_are_filled(name, registry):
    """A public dict (``solvers.METHODS``, ``kfac.RULES``) has no docstring of its own; its
    module documents it, and it is never empty."""
    assert len(registry) > 0, name


def test_every_module_declares_all():
    for mname in PUBLIC_MODULES:
        assert hasattr(_import(mname), "__all__"), mname
