"""Every docstring example in ``second`` runs and prints what it says.

Examples see ``torch`` and the module's own names, as a reader would after
``import torch`` and ``from <module> import *``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest
import torch

import second
from second._errors import SecondDeprecationWarning

with warnings.catch_warnings():  # walk_packages imports the deprecated second.approximations
    warnings.simplefilter("ignore", SecondDeprecationWarning)
    MODULES = sorted(
        info.name
        for info in pkgutil.walk_packages(second.__path__, prefix="second.")
        if not info.name.endswith("__main__")
    )


# Modules whose examples fail today, outside the foundation (plain `doctest.testmod` agrees);
# each owner removes its line when fixed.
KNOWN_FAILING: dict[str, str] = {}


def _param(name: str):
    if name in KNOWN_FAILING:
        return pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_FAILING[name], strict=False))
    return name


def _examples(module) -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    globs = {**vars(module), "torch": torch}
    return [t for t in finder.find(module, module.__name__, globs=globs) if t.examples]


def _importable(name: str):
    """The module, or ``None`` when it needs an optional dependency that is not installed."""
    try:
        with warnings.catch_warnings():  # a deprecated module (second.approximations) on purpose
            warnings.simplefilter("ignore", SecondDeprecationWarning)
            return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] == "second":
            raise
        return None


WITH_EXAMPLES = [n for n in MODULES if (m := _importable(n)) is not None and _examples(m)]


def test_modules_were_found():
    for name in ("second.func.products", "second.func.dense", "second.operators.base"):
        assert name in WITH_EXAMPLES


@pytest.mark.parametrize("name", [_param(n) for n in WITH_EXAMPLES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    tests = _examples(module)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    state = torch.random.get_rng_state()
    try:
        for t in tests:
            torch.manual_seed(0)
            runner.run(t)
    finally:
        torch.random.set_rng_state(state)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
