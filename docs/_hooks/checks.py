"""MkDocs hook: known docstring warnings, and a check that every public name has a page.

``mkdocs build --strict`` fails on any warning. The docstring warnings known today are let
through, each listed with its owner, who deletes the line when the docstring is fixed; a listed
warning that no longer occurs is named in the build's output (as information: a fix must not
fail the build). After the build,
every name in the ``__all__`` of each module rendered on an API page must have its own entry
there (``UNRENDERED`` lists, with owners, the names that do not yet).
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

AUTOREFS = "mkdocs_autorefs._internal.plugin"

# (logger name under mkdocs.plugins, pattern of the message, owner)
KNOWN: list[tuple[str, str, str]] = [
    # grouped parameter entries ("a, b: ...") are Sphinx/NumPy style, not Google style
    ("griffe", r"optim/hessian_free\.py:\d+: Parameter 'min_damping, max_damping'", "Newton"),
    ("griffe", r"optim/hessian_free\.py:\d+: Parameter 'boost, drop'", "Newton"),
    ("griffe", r"operators/(curvature|fisher)\.py:\d+: Parameter 'other arguments'", "engine"),
    # a doctest comment "A[[0, 2]][:, [1]]" read as a Markdown reference link (two pages)
    (AUTOREFS, r"submatrix\.py:\d+: .*Could not find cross-reference target ':, \[1'", "engine"),
]

# names in __all__ that mkdocstrings cannot render today: (module, name) -> why, owner
UNRENDERED: dict[tuple[str, str], str] = {
    ("second", "optim"): "a subpackage: it has its own page (second.optim)",
    ("second", "laplace"): "a subpackage: it has its own page (second.laplace)",
    ("second.newton", "model_cg"): "a submodule: the model CG is documented through its functions",
    (
        "second",
        "imaml",
    ): "the name is also a submodule (implicit/imaml.py), which shadows it: engine",
    ("second.spectral", "lanczos"): "the name is also a submodule (spectral/lanczos.py): engine",
    ("second.solvers", "METHODS"): "a constant without a docstring: solvers",
}

_seen: set[int] = set()
_log = logging.getLogger("mkdocs.hooks.checks")


class _Known(logging.Filter):
    def __init__(self, name: str):
        super().__init__()
        self.patterns = [(i, re.compile(p)) for i, (n, p, _) in enumerate(KNOWN) if n == name]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        msg = record.getMessage()
        for i, pattern in self.patterns:
            if pattern.search(msg):
                _seen.add(i)
                return False
        return True


def on_startup(command: str, dirty: bool) -> None:
    """Install the filters on the plugins' loggers."""
    for name in {n for n, _, _ in KNOWN}:
        logging.getLogger(f"mkdocs.plugins.{name}").addFilter(_Known(name))


def on_post_build(config) -> None:
    """Name the listed warnings that no longer occur; check every public name has an entry."""
    stale = [KNOWN[i] for i in range(len(KNOWN)) if i not in _seen]
    for _, pattern, owner in stale:
        # info, not a warning: fixing a docstring must not fail the build
        _log.info(f"docs/_hooks/checks.py: {pattern!r} ({owner}) no longer occurs: delete it")
    site = Path(config["site_dir"])
    for page in sorted(Path(config["docs_dir"]).glob("api/*.md")):
        html = (site / "api" / page.stem / "index.html").read_text()
        for module in re.findall(r"^::: ([\w.]+)", page.read_text(), flags=re.M):
            for name in importlib.import_module(module).__all__:
                rendered = f'id="{module}.{name}"' in html
                known = (module, name) in UNRENDERED
                if not rendered and not known:
                    _log.warning(f"api/{page.name}: {module}.{name} is public but has no entry")
                elif rendered and known:
                    _log.info(f"{module}.{name} is rendered now: delete it from UNRENDERED")
