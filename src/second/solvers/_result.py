"""The result every solver returns, and shared set-up."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._errors import (
    ConvergenceWarning,
    NegativeCurvatureWarning,
    NonFiniteError,
    outside_stacklevel,
)
from ..func.vectors import column_norms, parameters_to_vector, vector_to_parameters, wide
from ..operators.base import LinearOperator, aslinearoperator
from ..operators.wrap import DenseOperator

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
    """A linear system ``(A + damping I) x = b`` normalised to flat tensors.

    ``b`` may be a flat vector, a sequence of parameter-shaped tensors, or an ``n x k``
    matrix of right-hand sides (``block=True``; ``B`` is then ``n x k`` and ``b`` unset).
    Real and complex dtypes are accepted; ``method`` names the solver in messages, and a
    method in ``SYMMETRIC_METHODS`` refuses an operator that declares ``symmetric=False``.
    """

    def __init__(
        self,
        A,
        b,
        x0=None,
        damping: float = 0.0,
        *,
        method: str = "",
        allow_block: bool = False,
        allow_complex: bool = True,
        allow_negative_damping: bool = True,
    ):
        self.block = isinstance(b, Tensor) and b.dim() == 2
        if isinstance(b, Tensor):
            if b.dim() != 1 and not (self.block and allow_block):
                accepted = "a flat vector, an n x k matrix" if allow_block else "a flat vector"
                raise ValueError(
                    f"b must be {accepted} or a sequence of tensors, got shape {tuple(b.shape)}"
                )
            self.parts: list[Tensor] | None = None
            flat = b
        else:
            parts = list(b)
            if not parts or not all(isinstance(t, Tensor) for t in parts):
                raise TypeError("b must be a tensor or a non-empty sequence of tensors")
            self.parts = parts  # their shapes: the form of the solution
            flat = parameters_to_vector(parts)
        if flat.is_complex() and not allow_complex:
            raise TypeError(
                f"{method or 'this method'} does not take complex systems (dtype {flat.dtype}); "
                "cg and minres (Hermitian) and dense solve them in complex arithmetic"
            )
        if not flat.is_floating_point() and not flat.is_complex():
            raise TypeError(f"b must be a floating-point or complex tensor, got {flat.dtype}")
        if not torch.isfinite(flat).all():
            raise ValueError("b has NaN or Inf entries")
        flat = flat.detach()
        self.B = flat if self.block else flat.unsqueeze(1)  # always n x k
        self.b = flat if not self.block else None
        n = self.B.shape[0]
        op = aslinearoperator(A, n, dtype=flat.dtype, device=flat.device)
        if op.shape != (n, n):
            raise ValueError(f"the operator has shape {op.shape} but b has {n} rows")
        if op.dtype != flat.dtype:
            raise TypeError(f"b has dtype {flat.dtype}, the operator {op.dtype}")
        if op.device != flat.device:
            raise ValueError(f"b is on {flat.device}, the operator on {op.device}")
        dense_matrix = getattr(op, "A", None) if isinstance(op, DenseOperator) else None
        if dense_matrix is not None and not bool(torch.isfinite(dense_matrix).all()):
            # before the symmetry test: NaN != NaN makes a symmetric matrix look nonsymmetric
            raise NonFiniteError(
                f"{method or 'the solver'}: the operator's matrix has NaN or Inf entries"
            )
        if method in ITERATIVE_METHODS:
            check_magnitude(self.B, method)
        if method in SYMMETRIC_METHODS and not op.symmetric:
            raise ValueError(
                f"{method} needs a symmetric (Hermitian) operator and this one declares "
                f"symmetric=False ({type(op).__name__}); use method='dense' or lsmr for a "
                "nonsymmetric system, or declare the symmetry (e.g. DenseOperator(A, "
                "symmetric=True)) if the asymmetry is rounding"
            )
        damping = float(damping)
        if not math.isfinite(damping):
            raise ValueError(f"damping must be finite, got {damping}")
        if damping < 0 and not allow_negative_damping:
            raise ValueError(
                f"{method or 'this method'} needs damping >= 0 (got {damping}); minres, cg and "
                "dense take a negative damping (a shift A - |lambda| I)"
            )
        if damping:
            op = op.damped(damping)
        self.A = op
        self.damping = damping
        self.n = n
        self.method = method
        if x0 is None:
            self.x0 = None
        else:
            x0f = x0 if isinstance(x0, Tensor) else parameters_to_vector(x0)
            want = self.B.shape if self.block else flat.shape
            self.x0 = check_x0(x0f, want, flat.dtype, flat.device, "those of b")
        from .. import distributed as dist

        dist.check_same_values_across_ranks(
            f"the system ({method or 'solver'}'s b, x0 and damping)",
            op,
            self.B,
            self.x0,
            damping,
            hint="The operator's products are summed over the ranks, so every rank solves the "
            "same system: pass the same b on every rank (all-reduce a local gradient first), "
            "or build the operator with distributed=False to solve with this rank's data alone.",
        )
        self._start = op.matvecs

    @property
    def dtype(self) -> torch.dtype:
        return self.B.dtype

    @property
    def vector(self) -> Tensor:
        """The flat ``b`` of a single right-hand side (a block problem has none)."""
        if self.b is None:
            raise ValueError(f"{self.method or 'this method'} takes one right-hand side here")
        return self.b

    @property
    def matvecs(self) -> int:
        return self.A.matvecs - self._start

    def unflatten(self, x: Tensor):
        if self.parts is None:
            return x
        return vector_to_parameters(x, self.parts)

    def result(self, x: Tensor, **kwargs) -> SolveResult:
        res = SolveResult(x=self.unflatten(x.to(self.dtype)), matvecs=self.matvecs, **kwargs)
        return res


def flat_solution(res: SolveResult) -> Tensor:
    """``res.x`` of a solve whose ``b`` was a flat tensor (a tuple ``b`` gives a tuple)."""
    if not isinstance(res.x, Tensor):
        raise TypeError("expected the solution of a flat right-hand side, got a tuple of tensors")
    return res.x


def check_x0(x0, shape, dtype: torch.dtype, device, of: str) -> Tensor:
    """``x0`` detached on ``device``, after checking its shape, dtype and entries.

    Raises:
        ValueError: ``x0`` is not a tensor of ``shape`` and ``dtype`` (``of`` says whose they
            are, for the message), or has NaN or Inf entries.
    """
    if not isinstance(x0, Tensor) or x0.shape != tuple(shape) or x0.dtype != dtype:
        got = f"{tuple(x0.shape)}, {x0.dtype}" if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must have shape {tuple(shape)} and dtype {dtype} ({of}), got {got}")
    x0 = x0.detach().to(device)
    if not torch.isfinite(x0).all():
        raise ValueError("x0 has NaN or Inf entries")
    return x0


MAX_CHECKS = 3  # true-residual checks (one product each) before giving up on a drifting recurrence
STAGNATION_GAIN = 0.5  # a later true-residual check must halve the best one seen, or it stagnated

SYMMETRIC_METHODS = frozenset({"cg", "minres", "neumann", "lissa", "lowrank"})
ITERATIVE_METHODS = frozenset({"cg", "minres", "neumann", "lissa"})


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a real or complex dtype (``complex64 -> float32``)."""
    return torch.empty(0, dtype=dtype).real.dtype


def inner(a: Tensor, b: Tensor) -> Tensor:
    """``Re(a^H b)``, column by column for matrices (a real tensor of shape ``[k]`` or ``[]``).

    Computed in float64 (complex128) whatever the dtype: in float32 or bfloat16 the products
    of entries around ``1e-20`` underflow to 0, which made ``tol`` absolute there and read
    as ``p^T A p = 0`` (non-positive curvature) on a positive-definite operator.
    """
    w = wide(a.dtype)
    a, b = a.to(w), b.to(w)
    if a.dim() == 2:
        return (a.conj() * b).real.sum(0) if a.is_complex() else (a * b).sum(0)
    return torch.vdot(a, b).real if a.is_complex() else torch.dot(a, b)


def true_residual_norms(op, B: Tensor, X: Tensor) -> Tensor:
    """``||b_j - A x_j||`` per column, computed in float64 (complex128) from ``X`` as given.

    ``X`` is rounded to the operator's dtype first, so the residual is that of the
    solution the caller will receive; the product itself is the operator's (one product
    per column).
    """
    Xc = X.to(op.dtype)
    AX = op @ Xc[:, 0] if Xc.shape[1] == 1 else op @ Xc
    AX = AX.reshape(Xc.shape)
    wide = torch.complex128 if B.is_complex() else torch.float64
    return column_norms(B.to(wide) - AX.to(wide))


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
    return 20.0 * torch.finfo(real_dtype(dtype)).eps * bnorm


def check_true_residual(op, b: Tensor, x: Tensor, threshold: float):
    """``(true ||b - A x||, measurable floor, ok)``: one extra product.

    The residual is that of ``x`` rounded to the operator's dtype (what the caller gets),
    evaluated in float64.
    """
    true_r = float(true_residual_norms(op, b.unsqueeze(1), x.unsqueeze(1))[0])
    floor = measurable_residual(op.dtype, _norm(b))
    return true_r, floor, true_r <= threshold + floor


def report(res: SolveResult, warn: bool, stacklevel: int | None = None) -> SolveResult:
    """Warn about a solve that did not converge or met negative curvature; return ``res``.

    The one place where the solvers (and the applications that build a :class:`SolveResult`
    themselves) turn a result's flags into a ``ConvergenceWarning`` or a
    ``NegativeCurvatureWarning``.

    The warning points at the first frame outside ``second`` and ``torch``: the user's
    line, however deep in the library the solve was reached (a solver called directly,
    through :func:`second.solve`, an inverse operator or an application). An explicit
    ``stacklevel`` goes to ``warnings.warn`` as it is (2: the caller of ``report``).

    Example:
        >>> import warnings
        >>> import torch
        >>> from second.solvers import SolveResult, report
        >>> res = SolveResult(x=torch.zeros(2), converged=False, iterations=3, matvecs=3,
        ...                   method="cg", message="maxiter reached")
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = report(res, warn=True)
        >>> caught[0].category.__name__
        'ConvergenceWarning'
    """
    if not warn or res.converged:
        return res
    if stacklevel is None:  # the stack is walked only for a warning
        stacklevel = outside_stacklevel()
    if res.negative_curvature and res.info.get("warn_negative", True):
        warnings.warn(
            f"{res.method}: {res.message}", NegativeCurvatureWarning, stacklevel=stacklevel
        )
    else:
        warnings.warn(f"{res.method}: {res.message}", ConvergenceWarning, stacklevel=stacklevel)
    return res


def as_preconditioner(M, n: int, dtype, device) -> LinearOperator | None:
    """``M`` (an approximation of the inverse) as an operator, or ``None``."""
    if M is None:
        return None
    return aslinearoperator(M, n, dtype=dtype, device=device)


def preconditioner_hint(M: LinearOperator | None) -> str:
    """A note for a failed solve whose preconditioner is not symmetric (else ``""``).

    CG and MINRES need a symmetric positive-definite ``M``; a nonsymmetric one shows as
    ``r^T M r <= 0`` or as no convergence at all. It is not refused: the inverse of a
    symmetric matrix is symmetric only to rounding, which a matrix's entries may exceed.
    """
    if M is None or M.symmetric:
        return ""
    return (
        f"; the preconditioner M is not symmetric ({type(M).__name__}: its entries, or its "
        "declaration, say so) and cg and minres need a symmetric positive-definite M ~ A^-1: "
        "symmetrize it ((M + M^T) / 2)"
    )


def _norm(v: Tensor) -> float:
    """The Euclidean norm, accumulated in float64 (see :func:`column_norms`)."""
    return float(column_norms(v.reshape(-1, 1))[0])


# The iterative solvers' inner products are sums of squares of b's magnitude: in float64 they
# under- or overflow for a b whose norm is outside this range (in float32 and lower they are
# accumulated in float64, which covers the whole range)
SAFE_NORM = (1e-140, 1e140)


def check_magnitude(B: Tensor, method: str) -> None:
    """Refuse a float64 ``b`` whose norm the iterative solvers' inner products cannot carry.

    Raises:
        ValueError: a nonzero column of ``B`` (float64 or complex128) has a norm outside
            :data:`SAFE_NORM`; scaling ``b`` (the solution scales with it) or ``dense`` fixes it.
    """
    if B.dtype not in (torch.float64, torch.complex128):
        return
    n = column_norms(B)
    out = (n > 0) & ((n < SAFE_NORM[0]) | (n > SAFE_NORM[1]))
    if bool(out.any()):
        raise ValueError(
            f"{method}: ||b|| = {float(n[out][0]):.3e} is outside [{SAFE_NORM[0]:.0e}, "
            f"{SAFE_NORM[1]:.0e}], where the float64 inner products of an iterative solver "
            "under- or overflow; solve for b / ||b|| and scale x back (the solution is linear "
            "in b), or use method='dense'"
        )


def by_columns(solver, pb: Problem, warn: bool, **options) -> SolveResult:
    """Solve a block problem (``pb.B`` is ``n x k``) one column after another with ``solver``.

    The columns' results merge into one: ``x`` is ``n x k``, ``converged`` means every
    column converged, ``matvecs`` and ``iterations`` add up, and ``info`` keeps
    ``converged_columns``, ``messages`` and the per-column results under ``columns``.
    ``residual_norms[i]`` is the largest column residual after ``i`` iterations (a column
    that has stopped keeps its last), so ``residual_norms[0]`` is at ``x0``, as for a
    lock-step block solve. A ``callback`` in ``options`` gets the ``n x k`` block, as
    :func:`cg` gives it: the columns solved so far, the iterate of the column being
    solved, and ``x0`` (or 0) for the columns still to come.
    """
    results = []
    k = pb.B.shape[1]
    user_callback = options.pop("callback", None)
    X = torch.zeros_like(pb.B) if pb.x0 is None else pb.x0.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", NegativeCurvatureWarning)
        for j in range(k):
            x0 = None if pb.x0 is None else pb.x0[:, j]

            def column_callback(x, j=j):
                X[:, j] = x
                user_callback(X.clone())

            cb = None if user_callback is None else column_callback
            res_j = solver(pb.A, pb.B[:, j], x0=x0, damping=0.0, warn=False, callback=cb, **options)
            X[:, j] = res_j.x
            results.append(res_j)
    ok = [r.converged for r in results]
    depth = max((len(r.residual_norms) for r in results), default=0)
    history = [
        max(
            r.residual_norms[min(i, len(r.residual_norms) - 1)] for r in results if r.residual_norms
        )
        for i in range(depth)
    ]
    message = f"{sum(ok)} of {k} columns converged"
    if not all(ok):
        message += (
            "; "
            + "; ".join(
                f"column {j}: {r.message}" for j, r in enumerate(results) if not r.converged
            )[:2000]
        )
    negs = [r.negative_curvature_iteration for r in results if r.negative_curvature_iteration]
    res = SolveResult(
        x=torch.stack([r.x for r in results], dim=1),
        converged=all(ok),
        iterations=sum(r.iterations for r in results),
        matvecs=pb.matvecs,
        residual_norms=history,
        negative_curvature=any(r.negative_curvature for r in results),
        negative_curvature_iteration=min(negs) if negs else None,
        diverged=any(r.diverged for r in results),
        message=message,
        method=results[0].method if results else "",
        info={
            "converged_columns": ok,
            "messages": [r.message for r in results],
            "columns": results,
            "warn_negative": False,
        },
    )
    return report(res, warn)


def callbacks(callback, x: Tensor, problem: Problem) -> None:
    if callback is not None:
        callback(problem.unflatten(x))
