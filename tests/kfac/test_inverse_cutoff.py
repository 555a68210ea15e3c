"""KFAC/EK-FAC inverses (kfac/operators.py): the singular-approximation cutoff and the damping.

Regression tests of the review of the solvers: the singularity test was ``s <= 0`` exactly, so
rounding (+1e-17 from the eigendecomposition, 1e-33 from EK-FAC's squared rotated gradients)
let ``inverse()`` of a singular approximation multiply by ~1e30; and ``inverse(damping=d)``
replaced the operator's own damping while ``A.inverse(method, damping=d)`` and ``solve`` add d.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_cases import DT, INVERSE_TOL
from second import EKFACOperator, KFACOperator
from second._errors import SecondDeprecationWarning


def _layernorm_net(seed):
    """LayerNorm before a Linear: its outputs sum to 0, so that layer's factor A is singular."""
    torch.manual_seed(seed)
    X, y = torch.randn(20, 3, dtype=DT), torch.randn(20, 2, dtype=DT)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 2)).to(DT)
    return net, X, y


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
@pytest.mark.parametrize("seed", range(4))
def test_inverse_of_a_singular_approximation_at_zero_damping_is_refused(cls, seed):
    net, X, y = _layernorm_net(seed)
    K = cls(net, nn.MSELoss(), (X, y))
    with pytest.raises(ValueError, match="singular.*damping > 0"):
        K.inverse()
    # with a damping the inverse is the dense one
    v = torch.randn(K.shape[0], dtype=DT)
    lam = 1e-3
    want = torch.linalg.solve(K.to_dense() + lam * torch.eye(K.shape[0], dtype=DT), v)
    torch.testing.assert_close(K.inverse(damping=lam) @ v, want, **INVERSE_TOL)


def test_a_damping_below_the_rounding_level_is_refused_too():
    net, X, y = _layernorm_net(0)
    K = EKFACOperator(net, nn.MSELoss(), (X, y))
    with pytest.raises(ValueError, match="below the rounding level"):
        K.inverse(damping=1e-30)


@pytest.mark.parametrize("cls", [KFACOperator, EKFACOperator])
def test_inverse_damping_replacing_the_own_one_is_deprecated(cls):
    net, X, y = _layernorm_net(0)
    K = cls(net, nn.MSELoss(), (X, y), damping=0.05)
    v = torch.randn(K.shape[0], dtype=DT)
    eye = torch.eye(K.shape[0], dtype=DT)
    undamped = K.to_dense() - 0.05 * eye
    with pytest.warns(SecondDeprecationWarning, match="replaces the operator.s own"):
        x = K.inverse(damping=0.1) @ v
    torch.testing.assert_close(x, torch.linalg.solve(undamped + 0.1 * eye, v), **INVERSE_TOL)
    # the spellings that mean the same now and in 0.3 do not warn
    torch.testing.assert_close(K.inverse() @ v, torch.linalg.solve(K.to_dense(), v), **INVERSE_TOL)
    K0 = cls(net, nn.MSELoss(), (X, y))
    torch.testing.assert_close(
        K0.inverse(damping=0.1) @ v, torch.linalg.solve(undamped + 0.1 * eye, v), **INVERSE_TOL
    )


@pytest.mark.parametrize("dtype, damping", [(torch.float32, 0.1), (torch.float64, 1e-8)])
def test_a_small_positive_damping_inverts_a_singular_block(dtype, damping):
    # (B + damping I)^{-1} of a block with a null direction (a dead input feature) is well
    # defined for a damping above the rounding noise of its eigenvalues (eps * the largest,
    # ~0.03 in float32 and ~5e-11 in float64 here), even below the rank cutoff: not refused
    torch.manual_seed(0)
    model = nn.Linear(20, 10, bias=False).to(dtype)
    X = 30 * torch.randn(64, 20, dtype=dtype)
    X[:, 0] = 0.0
    y = torch.randn(64, 10, dtype=dtype)
    op = KFACOperator(model, nn.MSELoss(reduction="sum"), (X, y))
    v = torch.randn(op.shape[0], dtype=dtype)
    back = op.inverse(damping=damping) @ (op @ v + damping * v)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((back - v).norm() / v.norm()) < rtol
    with pytest.raises(ValueError, match="damping"):
        op.inverse(damping=0.0)
    with pytest.raises(ValueError, match="rounding level"):
        op.inverse(damping=1e-3 if dtype == torch.float32 else 1e-12)
