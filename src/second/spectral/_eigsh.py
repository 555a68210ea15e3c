"""A few eigenpairs of a symmetric operator: block Lanczos with thick restarts."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, overload

import torch
from torch import Tensor

from .._errors import ConvergenceWarning, outside_stacklevel
from .._progress import progress
from ..func.inner import gram, project_off, rows_per_chunk
from ..operators.base import aslinearoperator
from ._symmetry import check_symmetric_basis

_SAME_START_HINT = (
    "The operator's products are summed over the ranks, so every rank must start from the "
    "same block: pass the same v0 (or none) and a generator seeded alike on every rank (not "
    "with the rank), or none."
)

__all__ = ["eigsh", "EigshResult", "COPY_CHECK_STEPS"]

WHICH = ("LA", "SA", "LM", "BE")
CRITERIA = ("residual", "eigenvalue")
STALL_PASSES = 50
"""Passes without halving the largest bound, below ``sqrt(eps(dtype)) * max|theta|``, after
which eigsh stops uncertified (the products' rounding level: float32 operators)."""
STALL_IMPROVEMENT = 0.5
RITZ_EVERY_PAIRS = 8
"""With one vector and ``k`` wanted pairs, the Rayleigh-Ritz step (and the convergence test)
runs every ``max(1, k // RITZ_EVERY_PAIRS)`` products: its cost grows like ``n m^2`` in the
basis size ``m``, and a single vector needs many products for many pairs."""
COPY_CHECK_STEPS = 5
"""With ``block_size=1`` and ``k > 1`` (one vector, then a check): the Lanczos steps from a
fresh random vector, orthogonal to the basis, that must leave the certified pairs unchanged
before eigsh stops (a single Krylov vector sees one vector of a repeated eigenspace)."""


def _symmetric(T: Tensor) -> Tensor:
    return 0.5 * (T + T.mT)


def _bordered(T: Tensor, Q: Tensor, W: Tensor, AW: Tensor) -> Tensor:
    """The projected matrix of the basis ``[Q, W]`` from that of ``Q`` (``n (m + p) p`` work)."""
    C = gram(Q, AW)
    return torch.cat(
        [torch.cat([T, C], dim=1), torch.cat([C.mT, _symmetric(gram(W, AW))], dim=1)], dim=0
    )


def _residual_norms(Q: Tensor, AQ: Tensor, S: Tensor, theta: Tensor) -> Tensor:
    """``||A Q s_j - theta_j Q s_j||`` for the columns ``s_j`` of ``S`` (float64, by row chunks)."""
    S64 = S.to(torch.float64)
    sq = torch.zeros(S.shape[1], dtype=torch.float64, device=S.device)
    step = rows_per_chunk(2 * Q.shape[1] + S.shape[1])
    for i in range(0, Q.shape[0], step):
        R = (
            AQ[i : i + step].to(torch.float64) @ S64
            - (Q[i : i + step].to(torch.float64) @ S64) * theta
        )
        sq += (R * R).sum(0)
    return sq.sqrt()


@dataclass
class EigshResult:
    """What :func:`eigsh` found, with what it could certify.

    Attributes:
        eigenvalues: ``k`` Ritz values in ascending order (operator dtype).
        eigenvectors: ``n x k`` Ritz vectors (columns), or ``None``.
        residual_norms: ``||A y_i - theta_i y_i||`` of each pair (float64, exact: computed
            from kept products, not estimated).
        error_bounds: per pair, the bound on ``|theta_i - lambda_i|`` the stopping rule used:
            the residual norm for ``criterion="residual"``; ``min(||r_i||, ||r_i||^2 / gap_i)``
            for ``criterion="eigenvalue"`` (``gap_i`` from the unwanted Ritz values, an
            estimate).
        certified: per pair, whether its bound meets ``tol * max|theta|``.
        converged: every pair certified.
        matvecs: operator products used (a block product of ``p`` columns counts ``p``).
        passes: block products, i.e. traversals of the data for an operator over a dataset.
        data_passes: products in units of one product over all the data (the glossary's data
            pass; for an operator over a whole dataset every product, each column of a block
            included, reads it once, so this equals ``matvecs``).
        message: how it ended.

    Example:
        >>> res = eigsh(torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64)), k=2,
        ...             return_result=True)
        >>> res.converged, [round(v, 8) for v in res.eigenvalues.tolist()], res.passes >= 1
        (True, [7.0, 8.0], True)
    """

    eigenvalues: Tensor
    eigenvectors: Tensor | None
    residual_norms: list[float]
    certified: list[bool]
    converged: bool
    matvecs: int
    passes: int
    message: str = ""
    info: dict = field(default_factory=dict)
    error_bounds: list[float] = field(default_factory=list)

    @property
    def data_passes(self) -> float:
        """Products in units of one product over all the data (see the attributes)."""
        return float(self.matvecs)


@overload
def eigsh(
    A,
    k: int = 6,
    which: str = "LA",
    *,
    block_size: int | None = None,
    ncv: int | None = None,
    tol: float = 1e-6,
    criterion: str = "residual",
    maxiter: int | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: Literal[True] = True,
    return_result: Literal[False] = False,
    generator: torch.Generator | None = None,
    warn: bool = True,
    progressbar: bool | None = None,
) -> tuple[Tensor, Tensor]: ...


@overload
def eigsh(
    A,
    k: int = 6,
    which: str = "LA",
    *,
    block_size: int | None = None,
    ncv: int | None = None,
    tol: float = 1e-6,
    criterion: str = "residual",
    maxiter: int | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: Literal[False],
    return_result: Literal[False] = False,
    generator: torch.Generator | None = None,
    warn: bool = True,
    progressbar: bool | None = None,
) -> Tensor: ...


@overload
def eigsh(
    A,
    k: int = 6,
    which: str = "LA",
    *,
    block_size: int | None = None,
    ncv: int | None = None,
    tol: float = 1e-6,
    criterion: str = "residual",
    maxiter: int | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: bool = True,
    return_result: Literal[True],
    generator: torch.Generator | None = None,
    warn: bool = True,
    progressbar: bool | None = None,
) -> EigshResult: ...


def eigsh(
    A,
    k: int = 6,
    which: str = "LA",
    *,
    block_size: int | None = None,
    ncv: int | None = None,
    tol: float = 1e-6,
    criterion: str = "residual",
    maxiter: int | None = None,
    v0: Tensor | None = None,
    return_eigenvectors: bool = True,
    return_result: bool = False,
    generator: torch.Generator | None = None,
    warn: bool = True,
    progressbar: bool | None = None,
) -> tuple[Tensor, Tensor] | Tensor | EigshResult:
    r"""A few eigenpairs of a symmetric operator, by block Lanczos with thick restarts.

    SciPy-shaped. ``which``: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic,
    ``"LM"`` largest magnitude, ``"BE"`` both ends (half from each).

    The method: a block Krylov space of ``block_size`` columns, fully re-orthogonalized, with
    Rayleigh-Ritz on the kept products :math:`Q^\top A Q`. A block whose columns vanish (an
    invariant subspace, e.g. a repeated eigenvalue) is refilled with random directions
    orthogonal to the basis. The default block (``block_size=None``) is as wide as ``k``: it
    sees eigenvalues of multiplicity up to ``k`` (for ``k = 1`` it is plain Lanczos, the fewest
    products for one eigenvalue). ``block_size=1`` for ``k > 1`` is the cheapest on a spectrum
    without repeated eigenvalues (about half the products of block ``k`` on a network Hessian,
    BENCHMARKS.md), but a single Krylov vector sees one vector of a repeated eigenspace; it
    adds a **copy check**: once the ``k`` pairs are certified the space is extended by
    :data:`COPY_CHECK_STEPS` Lanczos steps from a fresh random vector orthogonal to the basis,
    and eigsh stops only if the wanted Ritz values did not move by more than the tolerance
    (else it goes on, and checks again). The check finds a copy well separated from the rest
    of the spectrum (a gap of a fifth of its spread or more); a closer one can be missed
    (it would need many more steps), which the default block does not. When the basis reaches ``ncv``
    columns (default ``max(4 k + 2 p, 40)``), it restarts thick: the wanted Ritz vectors and a
    few more are kept with their products, so no product is repeated. It stops as soon as every
    wanted pair is certified, or after ``maxiter`` products (default ``20 n``), or when the
    largest bound has not halved in :data:`STALL_PASSES` passes once below
    ``sqrt(eps) * max|theta|`` (the products' rounding level, e.g. a float32 operator asked
    for a tolerance it cannot resolve). Pairs it could not certify are reported (a
    :class:`~second.ConvergenceWarning` and ``certified`` in the result). Two stopping rules:

    * ``criterion="residual"`` (default): the pair's residual
      :math:`\|A y - \theta y\| \le \mathrm{tol} \cdot \max|\theta|` (computed exactly
      from the kept products). Eigenvalue *and* eigenvector are accurate; the residual bounds
      the distance from :math:`\theta` to the nearest eigenvalue rigorously.
    * ``criterion="eigenvalue"``: the eigenvalue alone to relative accuracy ``tol``, which
      takes far fewer products. The error of a Ritz value is of order
      :math:`\|r\|^2/\delta` (:math:`\delta` the gap to the rest of the spectrum; Saad,
      *Numerical Methods for Large Eigenvalue Problems*, Thm 3.8 and Kato-Temple), much
      smaller than :math:`\|r\|`. The bound used is :math:`\min(\|r\|, \|r\|^2/\delta)
      \le \mathrm{tol} \cdot \max|\theta|` with :math:`\delta` the distance to the nearest
      unwanted Ritz values less their own residual norms (an unconverged neighbour may hide
      a closer eigenvalue), and the Ritz value must also have moved by less than that over
      the last block. :math:`\delta` is estimated from Ritz values (as ARPACK's and SLEPc's
      error estimates are), so this bound is an estimate, not a certificate: on a tight
      cluster (e.g. 10, 9.999, 9.99, 9.9 over a dense spectrum) it can stop a few ``tol``
      off, or with a member of the cluster not yet found; ``"residual"`` is the safe choice
      there. The eigenvectors may be far less accurate than the eigenvalues.

    ``data_passes`` in the result counts products in units of one product over all the data
    (a block of ``p`` columns is ``p`` passes).

    A pair is certified only when its bound meets ``tol``, also once the basis spans the
    whole space (its Ritz pairs are then exact up to the products' rounding): the message
    says whether ``tol`` is below what the dtype resolves.

    Args:
        A: a symmetric :class:`~second.LinearOperator`, dense tensor or callable.
        k: number of eigenpairs.
        which: ``"LA"``, ``"SA"``, ``"LM"`` or ``"BE"``.
        block_size: columns per block product (one data traversal each); default ``k``;
            ``1`` for ``k > 1`` adds the copy check (see above).
        ncv: basis size before a thick restart.
        tol: relative tolerance of the stopping rule.
        criterion: ``"residual"`` or ``"eigenvalue"`` (see above).
        maxiter: product limit (default ``20 n``).
        v0: starting vector or ``n x p`` block.
        return_eigenvectors: return the vectors too.
        return_result: return an :class:`EigshResult` instead of the SciPy-style tuple.
        generator: random generator for the starting block and refills.
        warn: warn when a pair is not certified.
        progressbar: a bar over block products (``None``: :func:`second.set_progress`).

    Returns:
        ``(eigenvalues, eigenvectors)`` ascending (eigenvalues only without
        ``return_eigenvectors``), or an :class:`EigshResult`.

    Raises:
        ValueError: ``k`` outside ``[1, n]``, an unknown ``which`` or ``criterion``, or an
            operator that declares itself nonsymmetric or is clearly not symmetric (a probe
            compares ``u^T A v`` with ``v^T A u`` on the first basis vectors, from products
            eigsh takes anyway: a SciPy operator or a callable is declared symmetric when
            wrapped).

    Example:
        >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> vals = eigsh(A, k=2, which="LA", return_eigenvectors=False)
        >>> torch.allclose(vals, torch.tensor([9.0, 10.0], dtype=torch.float64))
        True
        >>> vals = eigsh(torch.eye(6, dtype=torch.float64), k=3, return_eigenvectors=False)
        >>> torch.allclose(vals, torch.ones(3, dtype=torch.float64))  # all three copies
        True
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(map(repr, WHICH))}, got {which!r}")
    if criterion not in CRITERIA:
        raise ValueError(
            f"criterion must be one of {', '.join(map(repr, CRITERIA))}, got {criterion!r}"
        )
    if not getattr(op, "symmetric", True):
        raise ValueError("eigsh needs a symmetric operator; this one declares symmetric=False")
    # a block as wide as k by default (it sees multiplicities up to k); one vector on request,
    # with a check from a fresh vector once the pairs certify
    p = min(n, block_size or k)
    checks = COPY_CHECK_STEPS if p == 1 and k > 1 else 0
    stride = max(1, k // RITZ_EVERY_PAIRS) if p == 1 else 1
    ncv = min(n, max(ncv or 0, 4 * k + 2 * p, 40))
    maxiter = 20 * n if maxiter is None else int(maxiter)
    dtype, dev = op.dtype, op.device
    from .. import distributed as dist

    dist.check_same_values_across_ranks(
        "eigsh's start (v0 and the generator's state)", op, v0, generator, hint=_SAME_START_HINT
    )
    g = generator or torch.Generator(device=dev).manual_seed(0)
    start_matvecs = op.matvecs
    passes = 0
    prev: Tensor | None = None  # the wanted Ritz values of the previous block
    best, since_best = math.inf, 0  # the smallest largest-bound so far, passes since then
    checking, check_ref = 0, None  # check steps left, the wanted Ritz values they check
    found = 0  # checks that changed the wanted pairs

    def randn(cols):
        return torch.randn(n, cols, generator=g, dtype=dtype, device=dev)

    def project(W, Q):
        """``W`` less its components along the orthonormal ``Q`` (twice, float64 coefficients)."""
        if Q is not None and Q.shape[1]:
            for _ in range(2):
                W = project_off(W, Q)
        return W

    def normalize(W):
        """An orthonormal basis of ``W``'s columns and their singular values, largest first.

        A float64 basis: by SVD. A lower-precision one: from the float64 Gram matrix, which
        resolves singular values down to 1e-8 of the largest, far below the
        ``1e3 eps(float32)`` at which a direction counts as vanished.
        """
        if dtype == torch.float64:
            U, s, _ = torch.linalg.svd(W, full_matrices=False)
            return U, s
        lam, V = torch.linalg.eigh(gram(W, W))
        lam, V = lam.flip(0).clamp_min(0.0), V.flip(1)
        s = lam.sqrt()
        return W @ (V / s.clamp_min(1e-300)).to(dtype), s

    # a direction whose remainder is below this share of its norm counts as vanished (for
    # half precision at most 1e-2: 1e3 eps would discard every Krylov direction)
    vanished = min(1e3 * torch.finfo(dtype).eps, 1e-2)

    def orthonormalize(W, Q):
        """Orthonormalize W against Q and itself; refill vanished columns with random ones."""
        scale = max(float(torch.linalg.matrix_norm(W)) if W.numel() else 0.0, 1.0)
        for attempt in range(4):
            U, s = normalize(project(W, Q))
            keep = s > vanished * scale
            if bool(keep.all()) or attempt == 3:
                if dtype == torch.float64 and not bool((s[keep] < 1e-4 * scale).any()):
                    return U[:, keep]
                # a second pass: orthonormal to the working precision (CholeskyQR2); in
                # float64 where a kept column was small (nearly in Q's span: its rounding
                # along Q grows by 1 / s when it is normalized)
                return normalize(project(U[:, keep], Q))[0]
            room = n - (0 if Q is None else Q.shape[1])
            missing = min(int((~keep).sum()), room - int(keep.sum()))
            W = (
                torch.cat([U[:, keep], randn(max(missing, 0))], dim=1)
                if missing > 0
                else U[:, keep]
            )
            scale = 1.0
        return W

    def extend(W, Q):
        """The next block: ``W`` orthonormalized against the basis, else random directions."""
        W = orthonormalize(W, Q)
        return W if W.shape[1] else orthonormalize(randn(min(p, n - Q.shape[1])), Q)

    def exact(how: str) -> str:
        """How a run ended whose basis holds every direction, by this pass's bounds."""
        return _exact_message(how, certified, bound, tol * scale, scale, criterion, dtype)

    if v0 is not None:
        V = v0.reshape(n, -1).to(dtype=dtype, device=dev)
        if V.shape[1] < p:
            V = torch.cat([V, randn(p - V.shape[1])], dim=1)
    else:
        V = randn(p)
    Q = orthonormalize(V, None)
    AQ = _apply(op, Q)
    T = _symmetric(gram(Q, AQ))  # the projected matrix Q^T A Q, kept as the basis grows
    passes += 1
    # every pass adds at least one product, so the product limit ends the loop first; the
    # bar's total is the limit in full blocks (it stops as soon as the pairs are certified)
    blocks = progress(
        range(maxiter + 2), total=maxiter // p + 1, desc="eigsh", unit="block", enabled=progressbar
    )
    probed = False  # the symmetry probe (on the first two basis vectors and more)
    for _ in blocks:
        if not probed and Q.shape[1] >= 2:
            check_symmetric_basis(Q, AQ, "eigsh", dtype)
            probed = True
        if (
            stride > 1
            and passes % stride
            and check_ref is None
            and Q.shape[1] + p <= ncv
            and op.matvecs - start_matvecs < maxiter
        ):  # one vector, many pairs: Rayleigh-Ritz every `stride` products (its cost is n m^2)
            W = extend(AQ[:, -p:], Q)
            if W.shape[1]:
                AW = _apply(op, W)
                T = _bordered(T, Q, W, AW)
                Q, AQ = torch.cat([Q, W], dim=1), torch.cat([AQ, AW], dim=1)
                passes += 1
                continue
        theta, S = torch.linalg.eigh(T)
        idx = _select(theta, k, which)
        res = _residual_norms(Q, AQ, S[:, idx], theta[idx])
        Q_rr = Q  # the basis of this Rayleigh-Ritz step (the eigenvectors are Q_rr S)
        scale = max(float(theta.abs().max()), 1e-300)
        if criterion == "residual":
            bound = res
        else:
            residual_of = partial(_ritz_residuals, Q, AQ, S, theta)
            bound, prev = _eigenvalue_bound(theta, idx, res, prev, residual_of)
        certified = bound <= tol * scale
        m = Q.shape[1]
        used = op.matvecs - start_matvecs
        fresh = False  # the next block: a fresh random direction instead of the Krylov one
        if check_ref is not None and _moved(theta[idx], check_ref, tol * scale):
            checking, check_ref, found = 0, None, found + 1  # a pair moved: not yet done
        done = bool(certified.all()) and idx.numel() == k
        if done and checks and check_ref is None:  # certified: check from a fresh vector
            checking, check_ref, fresh, done = checks, theta[idx].clone(), True, False
        elif done and check_ref is not None and checking > 0:
            checking -= 1
            done = checking == 0
        if done:
            message = f"converged: {k} pairs certified after {used} products ({passes} passes)"
            break
        # near the products' rounding level the bounds stop falling: stop there, uncertified
        worst = float(bound.max())
        if idx.numel() == k and worst < STALL_IMPROVEMENT * best:
            best, since_best = worst, 0
        else:
            since_best += 1
        if since_best >= STALL_PASSES and worst <= math.sqrt(torch.finfo(dtype).eps) * scale:
            message = (
                f"stagnated after {used} products: {int(certified.sum())} of {k} pairs "
                f"certified; largest {criterion} bound {worst:.2e} > {tol * scale:.2e}, not "
                f"halved in {STALL_PASSES} passes (tol {tol:g} is likely below what {dtype} "
                "products resolve: use float64 or a larger tol)"
            )
            break
        if m >= n and idx.numel() == k:  # the basis spans everything: exact up to rounding
            message = exact(f"the basis spans R^{n} ({used} products)")
            break
        if used >= maxiter and check_ref is not None and bool(certified.all()):
            message = (
                f"product limit ({maxiter}) reached during the copy check: {k} pairs certified, "
                "but the check for copies of a repeated eigenvalue did not finish"
            )
            break
        if used >= maxiter:
            message = (
                f"product limit ({maxiter}) reached: {int(certified.sum())} of {k} pairs "
                f"certified; largest {criterion} bound {float(bound.max()):.2e} > "
                f"{tol * scale:.2e}"
            )
            break
        # next block: the residuals of the wanted and nearby Ritz pairs, orthogonalized
        W = AQ[:, -p:]  # the next Krylov block, before orthogonalization
        if ncv - p < m < ncv:  # room for part of a block: fill the basis first
            W = W[:, : ncv - m]
        elif m >= ncv:  # thick restart: keep the wanted Ritz pairs and a few more
            keep = _select(theta, min(m - p, k + p), which)
            Sk = S[:, keep].to(dtype)
            Q, AQ = Q @ Sk, AQ @ Sk
            T = _symmetric(gram(Q, AQ))
            Rk = AQ - Q * theta[keep].to(dtype)
            if check_ref is None:  # (a check goes on from its fresh vector's Krylov block)
                W = Rk[:, torch.argsort(torch.linalg.vector_norm(Rk, dim=0), descending=True)[:p]]
        W = extend(randn(p) if fresh else W, Q)
        if W.shape[1] == 0:
            if idx.numel() == k:
                message = exact("no direction left outside the basis")
            else:
                message = f"no direction left outside a basis of {m} (fewer than k = {k})"
            break
        AW = _apply(op, W)
        passes += 1
        T = _bordered(T, Q, W, AW)
        Q, AQ = torch.cat([Q, W], dim=1), torch.cat([AQ, AW], dim=1)
    else:  # pragma: no cover - the product limit breaks first
        message = f"product limit ({maxiter}) reached"
    vals = theta[idx]
    order = torch.argsort(vals)
    certified = certified[order]
    result = EigshResult(
        eigenvalues=vals[order].to(dtype),
        eigenvectors=(
            Q_rr @ S[:, idx[order]].to(dtype) if return_eigenvectors or return_result else None
        ),
        residual_norms=res[order].tolist(),
        error_bounds=bound[order].tolist(),
        certified=certified.tolist(),
        converged=bool(certified.all()),
        matvecs=op.matvecs - start_matvecs,
        passes=passes,
        message=message,
        info={
            "block_size": p,
            "ncv": ncv,
            "basis": Q.shape[1],
            "criterion": criterion,
            "copy_check": checks,
            "copies_found": found,
            "copy_check_complete": not checks or check_ref is None or checking == 0,
        },
    )
    if warn and not result.converged:
        warnings.warn(f"eigsh: {message}", ConvergenceWarning, stacklevel=outside_stacklevel())
    if return_result:
        return result
    if not return_eigenvectors:
        return result.eigenvalues
    assert result.eigenvectors is not None  # formed whenever they are returned
    return result.eigenvalues, result.eigenvectors


def _exact_message(
    how: str,
    certified: Tensor,
    bound: Tensor,
    threshold: float,
    scale: float,
    criterion: str,
    dtype: torch.dtype,
) -> str:
    """How a run whose basis holds every direction ended: exact, or which bounds miss ``tol``.

    Rayleigh-Ritz on a basis of the whole space is exact up to the products' rounding, so a
    pair is still certified only if its bound meets the tolerance: a bound at the rounding
    level means ``tol`` is below what the dtype resolves; one far above it means the
    operator is not symmetric (its Ritz pairs are not eigenpairs).
    """
    if bool(certified.all()):
        return f"exact: {how}"
    worst = float(bound.max())
    missed = f"{int((~certified).sum())} of {certified.numel()} pairs"
    if worst <= math.sqrt(torch.finfo(dtype).eps) * scale:
        why = f"tol is below what {dtype} products resolve: use float64 or a larger tol"
    else:
        why = "far above rounding: the operator is likely not symmetric"
    return (
        f"{how}, but {missed} miss the tolerance: largest {criterion} bound {worst:.2e} > "
        f"{threshold:.2e} ({why})"
    )


def _moved(vals: Tensor, ref: Tensor, tol: float) -> bool:
    """Whether the wanted Ritz values moved by more than ``tol`` (as sets: sorted)."""
    return float((vals.sort().values - ref.sort().values).abs().max()) > tol


def _apply(op, V: Tensor) -> Tensor:
    """``A V`` as one block product (a single column goes through the vector path)."""
    if V.shape[1] == 1:
        return (op @ V[:, 0]).unsqueeze(1)
    return op @ V


def _ritz_residuals(Q: Tensor, AQ: Tensor, S: Tensor, theta: Tensor, j: Tensor) -> Tensor:
    """``||A Q s_j - theta_j Q s_j||`` of the Ritz pairs ``j`` (float64)."""
    return _residual_norms(Q, AQ, S[:, j], theta[j])


def _eigenvalue_bound(
    theta: Tensor, idx: Tensor, res: Tensor, prev: Tensor | None, residual_of
) -> tuple[Tensor, Tensor]:
    """Per wanted pair, ``min(||r||, ||r||^2 / gap)``, and at least the Ritz value's last move.

    ``gap`` is the distance to the nearest unwanted Ritz values less their own residual norms
    (``residual_of(indices)``; an unconverged neighbour may hide an eigenvalue closer than it
    looks), over the two nearest; none yet, or no positive gap: the residual alone. Returns the
    bounds and the wanted Ritz values, the next call's ``prev``.
    """
    vals = theta[idx]
    rest = torch.ones(theta.numel(), dtype=torch.bool)
    rest[idx] = False
    bound = res.clone()
    if bool(rest.any()):
        others = torch.nonzero(rest).flatten()
        dist = (vals.unsqueeze(1) - theta[others].unsqueeze(0)).abs()  # [k, unwanted]
        near = others[dist.topk(min(2, others.numel()), dim=1, largest=False).indices]
        uniq, inverse = torch.unique(near, return_inverse=True)
        r_near = residual_of(uniq)[inverse]  # [k, 2]
        gap = ((vals.unsqueeze(1) - theta[near]).abs() - r_near).min(dim=1).values
        ok = gap > 0
        bound[ok] = torch.minimum(res[ok], res[ok] ** 2 / gap[ok])
    if prev is None or prev.numel() != vals.numel():
        bound = torch.maximum(bound, res)  # nothing to compare with yet: the residual alone
    else:
        bound = torch.maximum(bound, (vals - prev).abs())
    return bound, vals


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    n = theta.numel()
    k = min(k, n)
    if which == "LA":
        return torch.arange(n - k, n)
    if which == "SA":
        return torch.arange(0, k)
    if which == "LM":
        return torch.argsort(theta.abs())[n - k :]
    lo = k // 2
    hi = k - lo
    return torch.cat([torch.arange(0, lo), torch.arange(n - hi, n)])
