"""The matrix families of the solver conformance suite, written from the cases SciPy tests.

Each family is a dense float64 (complex128) matrix with a right-hand side, a declared
symmetry and the facts the suite checks against: whether it is positive definite,
singular, complex. The same table drives tests/solvers/test_conformance.py and
benchmarks/bench_conformance.py (which runs SciPy on it side by side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    A: torch.Tensor  # float64 or complex128
    b: torch.Tensor
    symmetric: bool  # Hermitian for complex
    pd: bool  # positive definite
    singular: bool = False

    @property
    def complex(self) -> bool:
        return self.A.is_complex()

    def cast(self, low: bool):
        """``(A, b)`` in the working dtype: float64/complex128, or float32/complex64 if ``low``."""
        if not low:
            return self.A, self.b
        dt = torch.complex64 if self.complex else torch.float32
        return self.A.to(dt), self.b.to(dt)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def poisson1d(n: int = 40) -> torch.Tensor:
    """The second-difference matrix tridiag(-1, 2, -1): SPD, condition ~ 0.4 (n+1)^2."""
    A = 2 * torch.eye(n, dtype=torch.float64)
    i = torch.arange(n - 1)
    A[i, i + 1] = A[i + 1, i] = -1.0
    return A


def poisson2d(m: int = 20) -> torch.Tensor:
    """The 5-point Laplacian on an m x m grid (Kronecker sum of two 1-D ones)."""
    P, identity = poisson1d(m), torch.eye(m, dtype=torch.float64)
    return torch.kron(P, identity) + torch.kron(identity, P)


def spectrum(eigenvalues, seed=0) -> torch.Tensor:
    """A symmetric matrix with the given eigenvalues and random eigenvectors."""
    ev = torch.as_tensor(eigenvalues, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(len(ev), len(ev), generator=_gen(seed), dtype=torch.float64))
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)


def hermitian(eigenvalues, seed=0) -> torch.Tensor:
    ev = torch.as_tensor(eigenvalues, dtype=torch.float64).to(torch.complex128)
    n = len(ev)
    Z = torch.randn(n, n, generator=_gen(seed), dtype=torch.complex128)
    Q, _ = torch.linalg.qr(Z)
    A = Q @ torch.diag(ev) @ Q.mH
    return 0.5 * (A + A.mH)


def rhs(n, seed=1, complex_=False) -> torch.Tensor:
    dt = torch.complex128 if complex_ else torch.float64
    return torch.randn(n, generator=_gen(seed), dtype=dt)


def cases() -> dict[str, Case]:
    """Every family, by name."""
    out = {}

    def add(name, A, symmetric, pd, singular=False, b=None):
        b = rhs(A.shape[0], complex_=A.is_complex()) if b is None else b
        out[name] = Case(name, A, b, symmetric, pd, singular)

    P1 = poisson1d(40)
    add("poisson1d", P1, True, True, b=torch.arange(40, dtype=torch.float64))
    add("poisson2d", poisson2d(20), True, True, b=torch.arange(400, dtype=torch.float64))
    # SciPy's RandDiag: a diagonal, indefinite, nonsingular matrix
    add(
        "rand-diag",
        torch.diag(torch.tensor([6.0, -5, 2, 7, -1, 10, 4, -3, -8, 9]).double()),
        True,
        False,
    )
    R = torch.rand(40, 40, generator=_gen(2), dtype=torch.float64)
    add("rand-sym", R + R.T, True, False)  # indefinite
    add("rand-sym-pd", R @ R.T / 40 + 0.05 * torch.eye(40, dtype=torch.float64), True, True)
    add("spd-well", spectrum(torch.linspace(1.0, 10.0, 40), seed=5), True, True)
    add("ill-spd-1e6", spectrum(torch.logspace(0, 6, 50)), True, True)
    # a consistent singular PSD system: Neumann boundary conditions (null space = constants)
    N = P1.clone()
    N[0, 0] = N[-1, -1] = 1.0
    add("singular-consistent", N, True, False, singular=True, b=N @ rhs(40, seed=3))
    # nearly symmetric: one entry off by 1e-6 at condition 1e6 (symmetry must not be assumed)
    S = spectrum(torch.logspace(0, 6, 50))
    S[3, 7] += 1e-6
    add("near-symmetric", S, False, False)
    G = torch.randn(40, 40, generator=_gen(4), dtype=torch.float64)
    add("nonsymmetric", G + 12 * torch.eye(40, dtype=torch.float64), False, False)
    add("hermitian-pd", hermitian(torch.linspace(1.0, 50.0, 30)), True, True)
    add(
        "hermitian-indefinite",
        hermitian(torch.cat([-torch.linspace(1, 5, 10), torch.linspace(1, 20, 20)])),
        True,
        False,
    )
    return out


def true_residual(A: torch.Tensor, x, b: torch.Tensor, damping: float = 0.0) -> float:
    """``||b - (A + damping I) x||`` in float64 (complex128) from the x a solver returned."""
    wide = torch.complex128 if A.is_complex() else torch.float64
    A64, b64 = A.to(wide), b.to(wide)
    x64 = x.to(wide)
    r = b64 - A64 @ x64 - damping * x64
    return float(torch.linalg.vector_norm(r))
