"""Every Python block on the documentation's pages runs as written (one namespace per page)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "```python" in p.read_text())


def test_pages_with_code_were_found():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"getting-started.md", "guides/solvers.md", "guides/kfac.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(DOCS).as_posix())
def test_page_code_runs(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    namespace: dict = {"__name__": "docs"}
    default = torch.get_default_dtype()
    try:
        for block in blocks:
            exec(compile(block, str(page), "exec"), namespace)  # noqa: S102
    finally:
        torch.set_default_dtype(default)
