"""``second.solve``: one entry point for every inverse-curvature method."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..func.vectors import parameters_to_vector
from ..operators.base import LinearOperator, aslinearoperator
from ._cg import cg
from ._dense import dense
from ._lissa import lissa
from ._lowrank import lowrank
from ._lsmr import lsmr
from ._minres import minres
from ._neumann import neumann_solve
from ._result import SolveResult, _norm, measurable_residual, report, stopping_threshold

__all__ = ["solve", "METHODS", "choose_method"]


def _lsmr_square(A, b, *, damping: float = 0.0, **options) -> SolveResult:
    """LSMR on the square system ``(A + damping I) x = b`` (solve()'s meaning of damping).

    :func:`lsmr`'s own ``damping`` regularizes the least-squares problem instead, so the
    damping here enters the operator.
    """
    if damping:
        n = b.shape[0] if isinstance(b, torch.Tensor) else sum(t.numel() for t in b)
        dt = b.dtype if isinstance(b, torch.Tensor) else b[0].dtype
        dev = b.device if isinstance(b, torch.Tensor) else b[0].device
        A = aslinearoperator(A, n, dtype=dt, device=dev).damped(damping)
    res = lsmr(A, b, **options)
    if res.converged:  # a least-squares stationary point need not solve a square system
        bnorm = _norm(b if isinstance(b, torch.Tensor) else parameters_to_vector(b))
        dt = b.dtype if isinstance(b, torch.Tensor) else b[0].dtype
        limit = stopping_threshold(bnorm, options.get("tol", 1e-6), options.get("atol", 0.0))
        limit += measurable_residual(dt, bnorm)
        r = float(res.info.get("true_residual", res.residual_norm))
        if r > limit:
            res.converged = False
            res.message = (
                f"LSMR reached a least-squares solution, but ||b - A x|| = {r:.3e} > {limit:.3e}: "
                "the square system is inconsistent or too ill-conditioned for its dtype"
            )
            report(res, options.get("warn", True))
    return res


METHODS: dict[str, Callable[..., SolveResult]] = {
    "cg": cg,
    "minres": minres,
    "neumann": neumann_solve,
    "lissa": lissa,
    "lowrank": lowrank,
    "dense": dense,
    "lsmr": _lsmr_square,
}

# which of solve()'s iterative options each method can use
ITERATIVE_OPTIONS: dict[str, set[str]] = {
    "cg": {"x0", "M", "callback", "maxiter"},
    "minres": {"x0", "M", "callback", "maxiter"},
    "neumann": {"x0", "callback", "maxiter"},
    "lissa": set(),
    "lowrank": set(),
    "dense": set(),
    "lsmr": {"x0", "callback", "maxiter"},
}

DENSE_THRESHOLD = 1500  # parameters: forming the matrix costs n products, solving O(n^3)


def choose_method(A, n: int, damping: float = 0.0) -> str:
    """The method ``"auto"`` picks (see :func:`solve`)."""
    if n <= DENSE_THRESHOLD:
        return "dense"
    if getattr(A, "symmetric", True) is False:  # ours, or a SciPy operator that says so
        return "lsmr"  # cg and minres need symmetry
    psd = isinstance(A, LinearOperator) and A.psd
    if psd and damping >= 0:
        return "cg"
    return "minres"


def solve(
    A,
    b,
    method: str = "auto",
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    atol: float = 0.0,
    maxiter: int | None = None,
    x0=None,
    M=None,
    callback: Callable | None = None,
    **options,
) -> SolveResult:
    r"""Solve :math:`(A + \lambda I)\, x = b` for a curvature operator :math:`A`.

    Args:
        A: a :class:`~second.LinearOperator` (e.g. :class:`~second.HessianOperator`), a dense
            tensor, or a callable matvec on flat vectors.
        b: flat vector, parameter-shaped tensors (``x`` is returned in the same form), or an
            ``n x k`` matrix of right-hand sides (``cg``, ``minres``, ``neumann``, ``dense``).
            Complex Hermitian systems are solved by ``cg``, ``minres`` and ``dense``.
        method: ``"auto"``, ``"cg"``, ``"minres"``, ``"neumann"``, ``"lissa"``, ``"lowrank"``,
            ``"dense"``, ``"lsmr"``. ``"auto"`` forms the matrix and solves in float64 when
            ``n <= 1500``; otherwise CG for an operator known to be positive semi-definite
            (GGN, Fisher, damped PSD) and MINRES for anything else (a Hessian may be
            indefinite: CG would stop at negative curvature), with float64 recurrences when
            the products are in lower precision; LSMR for an operator that declares
            itself nonsymmetric. ``"lsmr"`` solves the square system by least squares.
        damping: :math:`\lambda`, applied as the explicit operator ``A + lambda I``; a
            negative value (a shift) is taken by ``minres``, ``cg`` and ``dense``.
        tol: relative tolerance of the stopping rule
            :math:`\|b - Ax\| \le \max(\mathrm{tol}\|b\|, \mathrm{atol})`.
        atol: absolute tolerance of the same rule.
        maxiter: iteration limit (method default when ``None``).
        x0: starting point.
        M: preconditioner approximating :math:`A^{-1}` (``cg``, ``minres``).
        callback: called with each iterate.
        **options: passed to the method (e.g. ``recurrence_dtype`` for MINRES,
            ``rank`` for lowrank, ``depth``/``repeats`` for LiSSA, ``warn=False``).

    Returns:
        A :class:`~second.SolveResult`. A run that did not converge warns
        (:class:`~second.ConvergenceWarning` or :class:`~second.NegativeCurvatureWarning`).

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
        >>> res = solve(A, torch.tensor([1.0, 0.0], dtype=torch.float64), method="minres", tol=1e-12)
        >>> torch.allclose(A @ res.x, torch.tensor([1.0, 0.0], dtype=torch.float64))
        True
    """
    if isinstance(b, torch.Tensor):
        n = b.shape[0] if b.dim() == 2 else b.numel()
    else:
        n = sum(t.numel() for t in b)
    chosen = choose_method(A, n, damping) if method == "auto" else method
    if chosen not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from 'auto', {', '.join(METHODS)}")
    # forward only what was set; a method that cannot use a set option says so (TypeError),
    # except that under "auto" the iterative hints are dropped when a direct method is chosen
    given = {"x0": x0, "M": M, "callback": callback, "maxiter": maxiter}
    given = {k: v for k, v in given.items() if v is not None}
    unsupported = sorted(set(given) - ITERATIVE_OPTIONS[chosen])
    if unsupported and method == "auto" and chosen in ("dense", "lowrank"):
        for k in unsupported:
            given.pop(k)
    elif unsupported:
        raise TypeError(f"method {chosen!r} does not take {', '.join(unsupported)}")
    kwargs = dict(damping=damping, tol=tol, **given)
    if chosen != "lissa":  # LiSSA's stopping rule is its predicted bias, not a residual
        kwargs["atol"] = atol
    if method == "auto" and chosen == "minres" and "recurrence_dtype" not in options:
        dt = b.dtype if isinstance(b, torch.Tensor) else b[0].dtype
        if dt in (torch.float32, torch.float16, torch.bfloat16, torch.complex64):
            # low-precision products, float64 (complex128) Lanczos
            options["recurrence_dtype"] = torch.float64
    res = METHODS[chosen](A, b, **kwargs, **options)
    if method == "auto":
        res.info["auto"] = chosen
    return res
