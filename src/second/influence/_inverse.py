r"""Ways to apply :math:`(C + \mu I)^{-1}` to many right-hand sides.

:math:`C` is the curvature of the data term, :math:`\mu` the damping.
Each strategy takes a ``[P, k]`` block of columns and returns ``[P, k]``; the ones with
an explicit inverse (dense, low rank, Kronecker-factored) do it in one shot, the
iterative ones call :func:`second.solve` once per column and keep the
:class:`~second.SolveResult` of every solve in ``results``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._errors import NegativeCurvatureWarning, outside_stacklevel
from ..func.dense import eigenvalue_cutoff
from ..solvers import lowrank_inverse, solve

__all__ = ["DenseInverse", "IterativeInverse", "LowRankInverseStrategy", "ApproximationInverse"]


class DenseInverse:
    r"""The exact inverse from the eigendecomposition of the dense float64 matrix.

    Eigenvalues within :func:`second.func.eigenvalue_cutoff` of zero (``max(P eps(float64),
    eps(dtype)) max|eigenvalue|``, ``dtype`` the model's) are dropped (pseudo-inverse, with
    a warning). A negative eigenvalue (an indefinite Hessian)
    warns with :class:`~second.NegativeCurvatureWarning`: the inverse exists but the
    first-order influence is then not a leave-one-out estimate.
    """

    explicit = True

    def __init__(self, matrix: Tensor, shift: float, dtype: torch.dtype):
        A = matrix.to(torch.float64)
        A = 0.5 * (A + A.T) + shift * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
        self.matrix = A
        evals, evecs = torch.linalg.eigh(A)
        cut = eigenvalue_cutoff(evals, A.shape[0], dtype)  # second's one pinv policy
        small = evals.abs() <= cut
        if bool(small.any()):
            warnings.warn(
                f"the damped curvature is singular ({int(small.sum())} eigenvalues below "
                f"{cut:.2e}): using the pseudo-inverse. Pass damping > 0 (the training run's "
                "weight decay, at least).",
                UserWarning,
                stacklevel=outside_stacklevel(),
            )
        if bool((evals < -cut).any()):
            warnings.warn(
                f"the damped curvature has a negative eigenvalue ({float(evals.min()):.3e}): "
                "the model is not at a minimum of the regularized objective, and influence is "
                "not a leave-one-out estimate there. Use curvature='ggn', or damping "
                f">= {-float(evals.min()):.3e}.",
                NegativeCurvatureWarning,
                stacklevel=outside_stacklevel(),
            )
        self.eigenvalues = evals
        self.eigenvectors = evecs
        self.inv_eigenvalues = torch.where(small, torch.zeros_like(evals), 1.0 / evals)
        self.dtype = dtype
        self.results: list = []

    def __call__(self, B: Tensor) -> Tensor:
        U = self.eigenvectors
        X = U @ (self.inv_eigenvalues[:, None] * (U.T @ B.to(torch.float64)))
        return X.to(self.dtype)


class IterativeInverse:
    """One :func:`second.solve` per column (``cg``, ``minres``, ``lissa``)."""

    explicit = False

    def __init__(self, op, shift: float, method: str, tol: float | None, maxiter, options: dict):
        self.op, self.shift, self.method = op, float(shift), method
        self.tol, self.maxiter, self.options = tol, maxiter, dict(options)
        self.results: list = []

    def __call__(self, B: Tensor) -> Tensor:
        cols = []
        for j in range(B.shape[1]):
            kwargs = dict(self.options)
            if self.method != "lissa":
                kwargs.setdefault("maxiter", self.maxiter)
            if self.tol is not None:
                kwargs.setdefault("tol", self.tol)
            res = solve(self.op, B[:, j].contiguous(), self.method, damping=self.shift, **kwargs)
            self.results.append(res)
            cols.append(res.x)
        return torch.stack(cols, dim=1)


class LowRankInverseStrategy:
    r"""Top-``rank`` eigenpairs of :math:`C` plus the exact :math:`1/\mu` on their complement."""

    explicit = True

    def __init__(self, op, shift: float, rank: int, eig_tol: float = 1e-6, **options):
        if shift <= 0:
            raise ValueError(
                "method='lowrank' needs damping > 0: the directions outside "
                "the top eigenspace are inverted as 1 / damping"
            )
        # options: complement="zero"|"mean"|"harmonic"|"weighted"|float, complement_probes,
        # complement_steps (see second.lowrank)
        self.inverse = lowrank_inverse(op, rank, shift, eig_tol=eig_tol, **options)
        self.results: list = []

    def __call__(self, B: Tensor) -> Tensor:
        return self.inverse(B)


class ApproximationInverse:
    """A Kronecker-factored approximation's own inverse (K-FAC, EK-FAC)."""

    explicit = True

    def __init__(self, apply_inverse, dtype: torch.dtype):
        self.apply_inverse = apply_inverse
        self.dtype = dtype
        self.results: list = []

    def __call__(self, B: Tensor) -> Tensor:
        return self.apply_inverse(B).to(self.dtype)
