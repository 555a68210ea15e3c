"""Packaging metadata: one version, the extras, the typing marker, the supported Pythons."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

import second

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version():
    project = PYPROJECT["project"]
    assert "version" in project["dynamic"] and "version" not in project
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "second.__version__"}
    assert importlib.metadata.version("second") == second.__version__


def test_extras_and_core():
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    assert {"plot", "data", "progress", "bench", "docs", "all"} <= set(extras)
    assert extras["all"] == ["second[plot,data,progress]"]
    core = {d.split(">")[0].split("=")[0].split("<")[0] for d in project["dependencies"]}
    assert core == {"torch", "numpy", "scipy"}  # progress bars (tqdm) are an extra


def test_typed_and_python_versions():
    assert (ROOT / "src" / "second" / "py.typed").exists()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["second"] == ["py.typed"]
    assert PYPROJECT["project"]["requires-python"] == ">=3.10"
    listed = {
        c.rsplit(" ", 1)[-1]
        for c in PYPROJECT["project"]["classifiers"]
        if c.startswith("Programming Language :: Python :: 3.")
    }
    assert listed == {"3.10", "3.11", "3.12", "3.13"}
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in listed  # this one is tested
