"""KFAC/EK-FAC inverses (kfac/inverse.py) against dense float64 inverses.

The damping, exact and pi-split, an inverse as a preconditioner, and the singular
approximation. Regression tests of the review of the solvers: the singularity test was
``s <= 0`` exactly, so rounding (+1e-17 from the eigendecomposition, 1e-33 from EK-FAC's
squared rotated gradients) let ``inverse()`` of a singular approximation multiply by ~1e30;
and ``inverse(damping=d)`` replaced the operator's own damping while
``A.inverse(method, damping=d)`` and ``solve`` add d.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import second
from kfac_cases import DT, INVERSE_TOL, layer_blocks, tanh_net
from second import EKFACOperator, GGNOperator, KFACOperator
from second._errors import SecondDeprecationWarning


def test_inverse_exact_and_pi_damping():
    model = tanh_net()
    X, y = torch.randn(6, 4, dtype=DT), torch.randn(6, 3, dtype=DT)
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    n, lam = K.shape[0], 0.05
    D = K.to_dense()
    inv = K.inverse(damping=lam).to_dense()
    torch.testing.assert_close(
        inv, torch.linalg.inv(D + lam * torch.eye(n, dtype=DT)), **INVERSE_TOL
    )
    # per-factor damping: blockdiag of ((G + sqrt(lam)/pi I) kron (A + pi sqrt(lam) I))^-1
    pinv = K.inverse(damping=lam, pi_damping=True).to_dense()
    for s, (_, A, G) in zip(layer_blocks(model), K.layers):
        pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
        r = math.sqrt(lam)
        Ad = A + pi * r * torch.eye(A.shape[0], dtype=DT)
        Gd = G + r / pi * torch.eye(G.shape[0], dtype=DT)
        block = torch.kron(torch.linalg.inv(Gd), torch.linalg.inv(Ad))
        # the layer's (W, b) columns: the bias is the last column of the matrix form
        d_in = A.shape[0] - 1
        perm = [o * (d_in + 1) + i for o in range(G.shape[0]) for i in range(d_in)]
        perm += [o * (d_in + 1) + d_in for o in range(G.shape[0])]
        torch.testing.assert_close(pinv[s, s], block[perm][:, perm], **INVERSE_TOL)


def test_inverse_as_preconditioner_in_solve():
    # softmax regression on badly scaled features: KFAC captures the input scaling
    torch.manual_seed(3)
    model = nn.Linear(6, 4).double()
    X = torch.randn(64, 6, dtype=DT) * torch.logspace(-1, 2, 6, dtype=DT)
    y = torch.randint(0, 4, (64,))
    G = GGNOperator(model, nn.CrossEntropyLoss(), (X, y))
    M = KFACOperator(model, nn.CrossEntropyLoss(), (X, y)).inverse(damping=1e-4)
    b = torch.randn(G.shape[0], dtype=DT)
    plain = second.solve(G, b, method="cg", damping=1e-4, tol=1e-8, maxiter=500)
    pre = second.solve(G, b, method="cg", damping=1e-4, tol=1e-8, maxiter=500, M=M)
    assert pre.converged and plain.converged
    assert pre.iterations < plain.iterations


def test_singular_factors_constant_inputs():
    # constant (zero) input features make A singular, like digits' blank pixels
    model = tanh_net()
    X, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 3, dtype=DT)
    X[:, :2] = 0.0
    K = KFACOperator(model, nn.MSELoss(), (X, y))
    assert torch.linalg.eigvalsh(K.layers[0][1]).min() < 1e-12
    inv = K.inverse(damping=1e-2)
    v = torch.randn(K.shape[0], dtype=DT)
    x = inv @ v
    torch.testing.assert_close(K.damped(1e-2) @ x, v, **INVERSE_TOL)
    with pytest.raises(ValueError, match="singular"):
        K.inverse(damping=0.0)
    E = EKFACOperator(model, nn.MSELoss(), (X, y))
    assert torch.isfinite(E.inverse(damping=1e-2) @ v).all()


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
    # not a rename (no old and new keyword): the meaning of damping= changes in 0.3
    match = r"inverse\(damping=0\.1\) replacing the operator.s own damping 0\.05.*"
    match += r"stops working in 0\.3: use a \w+ built with damping=0 and inverse\(damping=0\.1\)"
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        x = K.inverse(damping=0.1) @ v
    assert rec[0].filename == __file__  # the warning points at the caller's line
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
