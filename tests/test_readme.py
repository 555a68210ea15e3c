"""The README's tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

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
