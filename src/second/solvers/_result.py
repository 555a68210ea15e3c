"""The result every solver returns, and shared set-up."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._errors import ConvergenceWarning, NegativeCurvatureWarning
from ..operators.base import LinearOperator, aslinearoperator

__all__ = ["SolveResult"]


@dataclass
class SolveResult:
    """What a linear solve returns.

    Attributes:
        x: the solution, in the form ``b`` was given (flat tensor or tuple of tensors).
        converged: whether the stopping rule was met.
        iterations: iterations performed.
        matvecs: operator products used (including set-up, e.g. a scale estimate).
        residual_norms: ``||b - A x_k||`` (or the solver's estimate of it) after each
            iteration, ``residual_norms[0]`` at ``x0``.
        negative_curvature: whether a direction with ``p^T A p <= 0`` was met (the
            operator is not positive definite).
        negative_curvature_iteration: the iteration where it was first met, or ``None``.
        diverged: whether the iteration was stopped because it diverged.
        message: a readable account of how the solve ended.
        method: the method that produced it.
        info: method-specific extra facts (e.g. the scale of a Neumann series).
    """

    x: Tensor | tuple[Tensor, ...]
    converged: bool
    iterations: int
    matvecs: int
    residual_norms: list[float] = field(default_factory=list)
    negative_curvature: bool = False
    negative_curvature_iteration: int | None = None
    diverged: bool = False
    message: str = ""
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def residual_norm(self) -> float:
        """The last recorded residual norm."""
        return self.residual_norms[-1] if self.residual_norms else float("nan")

    def __repr__(self) -> str:
        return (
            f"SolveResult(method={self.method!r}, converged={self.converged}, "
            f"iterations={self.iterations}, matvecs={self.matvecs}, "
            f"residual_norm={self.residual_norm:.3e}, negative_curvature={self.negative_curvature}, "
            f"message={self.message!r})"
        )


class Problem:
    """A linear system ``(A + damping I) x = b`` normalised to flat tensors."""

    def __init__(self, A, b, x0=None, damping: float = 0.0):
        if isinstance(b, Tensor):
            if b.dim() != 1:
                raise ValueError(
                    f"b must be a flat vector or a sequence of tensors, got shape {tuple(b.shape)}"
                )
            self.shapes = None
            flat = b
        else:
            parts = list(b)
            if not parts or not all(isinstance(t, Tensor) for t in parts):
                raise TypeError("b must be a tensor or a non-empty sequence of tensors")
            self.shapes = [t.shape for t in parts]
            flat = torch.cat([t.reshape(-1) for t in parts])
        if not torch.isfinite(flat).all():
            raise ValueError("b has NaN or Inf entries")
        self.b = flat.detach()
        n = self.b.numel()
        op = aslinearoperator(A, n, dtype=self.b.dtype, device=self.b.device)
        if op.shape != (n, n):
            raise ValueError(f"the operator has shape {op.shape} but b has {n} entries")
        if op.dtype != self.b.dtype:
            raise TypeError(f"b has dtype {self.b.dtype}, the operator {op.dtype}")
        if op.device != self.b.device:
            raise ValueError(f"b is on {self.b.device}, the operator on {op.device}")
        if damping:
            if damping < 0 or not torch.isfinite(torch.tensor(float(damping))):
                raise ValueError(f"damping must be finite and >= 0, got {damping}")
            op = op.damped(damping)
        self.A = op
        self.damping = float(damping)
        self.n = n
        if x0 is None:
            self.x0 = None
        else:
            x0f = x0 if isinstance(x0, Tensor) else torch.cat([t.reshape(-1) for t in x0])
            if x0f.shape != self.b.shape or x0f.dtype != self.b.dtype:
                raise ValueError("x0 must have the shape and dtype of b")
            self.x0 = x0f.detach().to(self.b.device)
        self._start = op.matvecs

    @property
    def matvecs(self) -> int:
        return self.A.matvecs - self._start

    def unflatten(self, x: Tensor):
        if self.shapes is None:
            return x
        out, offset = [], 0
        for s in self.shapes:
            k = int(torch.Size(s).numel())
            out.append(x[offset : offset + k].reshape(s))
            offset += k
        return tuple(out)

    def result(self, x: Tensor, **kwargs) -> SolveResult:
        res = SolveResult(x=self.unflatten(x.to(self.b.dtype)), matvecs=self.matvecs, **kwargs)
        return res


def stopping_threshold(bnorm: float, tol: float, atol: float) -> float:
    """SciPy's rule: stop when ``||r|| <= max(tol * ||b||, atol)``."""
    if tol < 0 or atol < 0:
        raise ValueError(f"tol and atol must be >= 0, got {tol}, {atol}")
    return max(tol * bnorm, atol)


def measurable_residual(dtype: torch.dtype, bnorm: float) -> float:
    """The smallest residual that can be measured in ``dtype``: ``20 eps ||b||``.

    ``b - A x`` subtracts two vectors of size ~``||b||`` computed in the products' dtype, so
    in float32 a residual below ~``1e-6 ||b||`` is rounding noise; in float64 the floor is
    negligible. A true residual within ``max(tol ||b||, atol)`` plus this floor counts as met.
    """
    return 20.0 * torch.finfo(dtype).eps * bnorm


def check_true_residual(op, b: Tensor, x: Tensor, threshold: float):
    """``(true ||b - A x||, measurable floor, ok)``: one extra product."""
    true_r = _norm(b - (op @ x.to(op.dtype)).to(b.dtype))
    floor = measurable_residual(op.dtype, _norm(b))
    return true_r, floor, true_r <= threshold + floor


def report(res: SolveResult, warn: bool, stacklevel: int = 3) -> SolveResult:
    """Warn about a solve that did not converge or met negative curvature."""
    if not warn:
        return res
    if res.negative_curvature and not res.converged and res.info.get("warn_negative", True):
        warnings.warn(
            f"{res.method}: {res.message}", NegativeCurvatureWarning, stacklevel=stacklevel
        )
    elif not res.converged:
        warnings.warn(f"{res.method}: {res.message}", ConvergenceWarning, stacklevel=stacklevel)
    return res


def as_preconditioner(M, n: int, dtype, device) -> LinearOperator | None:
    """``M`` (an approximation of the inverse) as an operator, or ``None``."""
    if M is None:
        return None
    return aslinearoperator(M, n, dtype=dtype, device=device)


def _norm(v: Tensor) -> float:
    return float(torch.linalg.vector_norm(v))


def callbacks(callback, x: Tensor, problem: Problem) -> None:
    if callback is not None:
        callback(problem.unflatten(x))
