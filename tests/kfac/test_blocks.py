"""Blocks: dense equivalents, exactness of Kronecker blocks, damping applied at call time."""

from __future__ import annotations

import math

import pytest
import torch

from kfac_cases import DT, EXACT_TOL, INVERSE_TOL, LOSSES, deep_linear, dense_ggn, layer_blocks
from second.kfac import (
    Capture,
    DiagonalBlock,
    EigenBlock,
    FactorStats,
    KroneckerBlock,
    batch_statistics,
    curvature_columns,
    find_layers,
)

DAMPINGS = [0.0, 1e-3, 0.7]


def spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n + 2, generator=g, dtype=DT)
    return B @ B.T / n


def random_M(k: int, d_G: int, d_A: int) -> torch.Tensor:
    return torch.randn(k, d_G, d_A, dtype=DT)


def vec(M: torch.Tensor) -> torch.Tensor:
    """Row-major vectorization of ``[k, d_G, d_A]``: ``[d_G * d_A, k]``."""
    return M.reshape(M.shape[0], -1).T


def factors(diag_A: bool):
    A = torch.rand(4, dtype=DT) + 0.1 if diag_A else spd(4, 1)
    return A, spd(3, 2)


def dense_A(A: torch.Tensor) -> torch.Tensor:
    return torch.diag(A) if A.dim() == 1 else A


def pi_dense(A: torch.Tensor, G: torch.Tensor) -> float:
    """pi from the traces of the dense factors (not from the eigenvalues)."""
    Ad = dense_A(A)
    return math.sqrt((Ad.trace() / Ad.shape[0]) / (G.trace() / G.shape[0]))


# ----------------------------------------------------------------------------- exactness
def _matrix_order(layer) -> list[int]:
    """For each parameter index (weight row-major, then bias) its index in the matrix form."""
    d_in, d_A = layer.d_in, layer.d_A
    perm = [o * d_A + i for o in range(layer.d_G) for i in range(d_in)]
    if layer.has_bias:
        perm += [o * d_A + d_in for o in range(layer.d_G)]
    return perm


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_kronecker_block_equals_dense_block_linear_network_one_datum(loss):
    # a deep linear network and one datum: A (x) G is the exact GGN block of every layer
    make_loss, make_y = LOSSES[loss]
    model, loss_fn = deep_linear(), make_loss()
    X, y = torch.randn(1, 4, dtype=DT), make_y(1, 3)
    layers = find_layers(model)
    with Capture(layers) as cap:
        out = model(X)
    S = curvature_columns(loss_fn, out, y, loss_fn.reduction, "type2")
    stats = FactorStats(layers, [])
    batch_statistics(layers, [], out, S, cap, stats)
    w = 1.0 / stats.n if loss_fn.reduction == "mean" else 1.0
    G_exact = dense_ggn(model, loss_fn, X, y)
    for layer, s, A, nA, G in zip(layers, layer_blocks(model), stats.A, stats.nA, stats.G):
        block = KroneckerBlock(A / nA, G * w)
        perm = _matrix_order(layer)
        want = G_exact[s, s]
        torch.testing.assert_close(block.to_dense()[perm][:, perm], want, **EXACT_TOL[DT])
        torch.testing.assert_close(block.eigen().to_dense()[perm][:, perm], want, **EXACT_TOL[DT])


# ----------------------------------------------------------------------------- damping
@pytest.mark.parametrize("diag_A", [False, True])
def test_products_damped_at_call_time_equal_dense(diag_A):
    A, G = factors(diag_A)
    K = torch.kron(G, dense_A(A))
    n = K.shape[0]
    kron, eig = KroneckerBlock(A, G), EigenBlock.from_factors(A, G)
    M = random_M(2, 3, 4)
    for lam in [*DAMPINGS, DAMPINGS[1]]:  # the same blocks, damping changed between calls
        want = (K + lam * torch.eye(n, dtype=DT)) @ vec(M)
        torch.testing.assert_close(vec(kron.matmul(M, lam)), want, **INVERSE_TOL)
        torch.testing.assert_close(vec(eig.matmul(M, lam)), want, **INVERSE_TOL)
    torch.testing.assert_close(kron.to_dense(), K, rtol=0, atol=0)
    torch.testing.assert_close(eig.to_dense(), K, **INVERSE_TOL)


@pytest.mark.parametrize("diag_A", [False, True])
def test_exact_damping_solve_equals_dense_inverse(diag_A):
    A, G = factors(diag_A)
    K = torch.kron(G, dense_A(A))
    eig = EigenBlock.from_factors(A, G)
    M = random_M(3, 3, 4)
    for lam in DAMPINGS[1:] + DAMPINGS[1:2]:
        want = torch.linalg.solve(K + lam * torch.eye(K.shape[0], dtype=DT), vec(M))
        torch.testing.assert_close(vec(eig.solve(M, lam)), want, **INVERSE_TOL)
        torch.testing.assert_close(vec(eig.solve(M, lam, split="exact")), want, **INVERSE_TOL)


@pytest.mark.parametrize("diag_A", [False, True])
def test_pi_damping_equals_dense_damped_factors(diag_A):
    # pi-damping: ((A + pi sqrt(lam) I) (x) (G + sqrt(lam)/pi I))^-1, pi from the traces
    A, G = factors(diag_A)
    eig = EigenBlock.from_factors(A, G)
    assert eig.pi() == pytest.approx(pi_dense(A, G), rel=1e-12)
    M = random_M(2, 3, 4)
    for lam in DAMPINGS[1:] + DAMPINGS[1:2]:
        r, pi = math.sqrt(lam), pi_dense(A, G)
        Ad = dense_A(A) + pi * r * torch.eye(4, dtype=DT)
        Gd = G + r / pi * torch.eye(3, dtype=DT)
        want_inv = torch.linalg.inv(torch.kron(Gd, Ad))
        torch.testing.assert_close(
            vec(eig.solve(M, lam, split="pi")), want_inv @ vec(M), **INVERSE_TOL
        )
        inv = eig.inverse(lam)  # the same inverse as an explicit Kronecker block
        assert isinstance(inv, KroneckerBlock) and inv.diag_A == diag_A
        torch.testing.assert_close(inv.to_dense(), want_inv, **INVERSE_TOL)
        spectrum = eig.damped_eigenvalues(lam, "pi").reshape(-1)
        torch.testing.assert_close(
            spectrum.sort().values, torch.linalg.eigvalsh(torch.kron(Gd, Ad)), **INVERSE_TOL
        )


def test_corrected_eigenvalues_damping_and_errors():
    # EK-FAC: the eigenbasis of A (x) G with other eigenvalues; exact damping only
    A, G = factors(False)
    base = EigenBlock.from_factors(A, G)
    s = torch.rand(3, 4, dtype=DT) + 0.05
    e = base.with_eigenvalues(s)
    Q = torch.kron(base.QG, base.QA)
    D = Q @ torch.diag(s.reshape(-1)) @ Q.T
    torch.testing.assert_close(e.to_dense(), D, **INVERSE_TOL)
    M = random_M(2, 3, 4)
    for lam in (0.0, 0.3):
        want = torch.linalg.solve(D + lam * torch.eye(12, dtype=DT), vec(M))
        torch.testing.assert_close(vec(e.solve(M, lam)), want, **INVERSE_TOL)
    with pytest.raises(ValueError, match="per-factor"):
        e.solve(M, 0.1, split="pi")
    with pytest.raises(ValueError, match="per-factor"):
        e.inverse(0.1)
    with pytest.raises(ValueError, match="split"):
        base.solve(M, 0.1, split="kron")


def test_diagonal_block():
    d = torch.rand(5, dtype=DT)
    D = DiagonalBlock(d)
    v = torch.randn(5, dtype=DT)
    for lam in DAMPINGS:
        dense = torch.diag(d) + lam * torch.eye(5, dtype=DT)
        torch.testing.assert_close(D.matmul(v, lam), dense @ v, rtol=0, atol=0)
        if lam > 0:
            torch.testing.assert_close(D.solve(v, lam), torch.linalg.solve(dense, v), **INVERSE_TOL)
