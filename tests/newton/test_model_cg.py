"""second.newton.model_cg: damped CG that tracks the quadratic model."""

from __future__ import annotations

import math

import torch

from newton_cases import DT, EXACT, model_value, spd
from second.newton.model_cg import model_cg


def test_model_cg_tracks_the_quadratic_model():
    A = spd(6)
    g = torch.randn(6, dtype=DT)
    res = model_cg(lambda v: A @ v, g, maxiter=50, tol=1e-12, save_at={1, 2, 3})
    torch.testing.assert_close(res.x, -torch.linalg.solve(A, g), **EXACT)
    torch.testing.assert_close(res.Ax, A @ res.x, **EXACT)
    assert math.isclose(res.phi, model_value(A, g, res.x), rel_tol=1e-9)
    assert [i for i, _, _ in res.saved][:3] == [1, 2, 3]
    warm = model_cg(lambda v: A @ v, g, x0=res.x, tol=1e-10)
    assert warm.iterations == 0 and warm.matvecs == 1
