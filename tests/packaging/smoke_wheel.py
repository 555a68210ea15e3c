"""Smoke test of an installed wheel (``make wheel-check``): run from outside the source tree.

Checks that the installed package (not ``src/``) imports, ships ``py.typed``, agrees with its
metadata on the version, computes a Hessian-vector product and a solve against dense float64
references, and that the console script answers ``--version`` and runs ``second compare``
without the optional extras (the table first, then one line naming the ``plot`` extra).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import second

pkg = Path(second.__file__).resolve().parent
assert "site-packages" in pkg.parts, f"imported from {pkg}, not from the installed wheel"
assert (pkg / "py.typed").exists(), "py.typed is missing from the wheel"
assert importlib.metadata.version("second") == second.__version__

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
X, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 1, dtype=torch.float64)
loss_fn = torch.nn.MSELoss()
H = second.HessianOperator(model, loss_fn, (X, y))
Hd = H.to_dense()
v = torch.randn(H.shape[1], dtype=torch.float64)
assert torch.allclose(H @ v, Hd @ v, atol=1e-12)
res = second.solve(H, H.gradient(), tol=1e-10)
assert res.converged, res.message
assert torch.allclose(Hd @ res.x, H.gradient(), atol=1e-8)

exe = shutil.which("second", path=str(Path(sys.executable).parent))
assert exe, "the console script `second` is not installed"
out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
assert out.startswith(f"second {second.__version__}"), out
with tempfile.TemporaryDirectory() as d:
    r = subprocess.run(
        [exe, "compare", "--seeds", "1", "--methods", "auto", "--out-dir", d],
        capture_output=True,
        text=True,
    )
assert r.returncode == 0, r.stderr
assert "| hessian | auto | converged |" in r.stdout, r.stdout
has_mpl = importlib.util.find_spec("matplotlib") is not None
assert has_mpl or "pip install 'second[plot]'" in r.stderr, r.stderr
print(f"wheel-check: second {second.__version__} from {pkg}: HVP, solve and CLI fine")
