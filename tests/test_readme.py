"""The README's tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs():
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    import torch

    default = torch.get_default_dtype()
    try:
        exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102
    finally:
        torch.set_default_dtype(default)
    grad = namespace["hypergradient"](
        namespace["inner"], lambda w, h: (w**2).sum(), namespace["t"] / 2, namespace["h"]
    ).grad
    # d/dh |t|^2 / (1 + e^h)^2 at h = 0: -2 |t|^2 e^h / (1 + e^h)^3 = -10 / 8
    assert abs(float(grad) + 1.25) < 1e-10


def _update_readme():
    import importlib.util

    path = README.parent / "scripts" / "update_readme.py"
    spec = importlib.util.spec_from_file_location("update_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_block_is_the_excerpt_format():
    """The block between the markers is a table in readme_excerpt's format (checked fast)."""
    from second.compare import readme_excerpt

    block = _update_readme().current_block(README.read_text())
    header = readme_excerpt([]).splitlines()
    assert block.splitlines()[:2] == header
    assert "`second.solve` (`auto`) | converged | 1.0000 / 1.0000 | 5/5" in block


def test_readme_excerpt_rounds_to_machine_independent_buckets():
    from second.compare import readme_excerpt

    entry = dict(
        curvature="hessian",
        method="seed-cg",
        cosine_median=0.1854,
        cosine_min=float("nan"),
        status="unchecked",
        converged="-",
        negative_curvature="-",
        diverged="-",
    )
    row = readme_excerpt([entry]).splitlines()[-1]
    assert "< 0.5 / NaN" in row and "(no report)" in row
    entry.update(method="auto", cosine_median=0.99999, cosine_min=0.99996, status="converged")
    entry.update(converged="5/5", negative_curvature="5/5", diverged="0/5")
    row = readme_excerpt([entry]).splitlines()[-1]
    assert "| converged | 1.0000 / 1.0000 | 5/5 | 5/5 negative curvature |" in row


@pytest.mark.slow
def test_readme_block_matches_a_fresh_demo_run():
    module = _update_readme()
    assert module.current_block(README.read_text()) == module.fresh_block()
