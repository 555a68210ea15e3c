"""Randomized trace, diagonal and Frobenius-norm estimators."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal, overload

import torch
from torch import Tensor

from .. import distributed as dist
from ..func.inner import gram, project_off
from ..operators.base import aslinearoperator
from ._symmetry import check_symmetric_basis

__all__ = ["trace", "diagonal", "frobenius_norm", "Estimate"]


@dataclass
class Estimate:
    """A randomized estimate with its standard error.

    Attributes:
        value: the estimate (a scalar tensor, or a vector for a diagonal).
        std_error: its estimated standard error (same shape; 0 for an exact method, NaN
            when the spread is unknown: a random estimate from a single term).
        matvecs: operator products used (a block of ``k`` columns counts ``k``).
        passes: block products, i.e. traversals of the data for an operator over a dataset.
        method: the method used.

    ``data_passes`` is ``matvecs`` in units of one product over all the data (the glossary's
    data pass: each column of a block product counts).

    Example:
        >>> A = torch.diag(torch.linspace(1.0, 2.0, 50, dtype=torch.float64))
        >>> est = trace(A, 40, method="hutchinson", return_result=True)
        >>> abs(float(est.value) - 75.0) < 5 * float(est.std_error) + 1e-9, est.matvecs
        (True, 40)
    """

    value: Tensor
    std_error: Tensor
    matvecs: int
    passes: int
    method: str

    @property
    def data_passes(self) -> float:
        """Products in units of one product over all the data (``matvecs``)."""
        return float(self.matvecs)


class _Counter:
    """Products and block products of one estimate."""

    def __init__(self, op):
        self.op, self.start, self.passes = op, op.matvecs, 0

    def __call__(self, V: Tensor) -> Tensor:
        self.passes += 1
        return (self.op @ V[:, 0]).unsqueeze(1) if V.shape[1] == 1 else self.op @ V

    @property
    def matvecs(self) -> int:
        return self.op.matvecs - self.start


def _rademacher(n: int, k: int, g: torch.Generator, dtype, device) -> Tensor:
    return torch.randint(0, 2, (n, k), generator=g, device=device).to(dtype) * 2 - 1


def _gen(generator: torch.Generator | None, op) -> torch.Generator:
    """The caller's generator, else one seeded from torch's global generator.

    Without a generator the seed is drawn from the global one, so ``torch.manual_seed``
    makes an estimate reproducible and repeated calls draw new probes. For an operator whose
    products are summed over a process group (every rank must draw the same probes) rank 0's
    seed is taken on every rank; a caller's generator must then be in the same state on every
    rank (``ValueError`` otherwise: probes that differ per rank estimate no matrix).
    """
    if generator is not None:
        dist.check_same_values_across_ranks("the generator's state", op, generator, hint=_GEN_HINT)
        return generator
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64).to(op.device)
    if _collective(op):
        seed = dist.all_reduce_sum(seed * int(dist.rank() == 0))
    return torch.Generator(device=op.device).manual_seed(int(seed.item()))


_GEN_HINT = (
    "The operator's products are summed over the ranks, so every rank must draw the same "
    "random probes: seed the generator alike on every rank (not with the rank), or pass "
    "generator=None (rank 0's seed is then used everywhere)."
)


def _collective(op, depth: int = 0) -> bool:
    """Whether ``op``'s products are all-reduced over a process group (through wrappers)."""
    return dist.collective_operator(op, depth)


@overload
def trace(
    A,
    num_matvecs: int = 100,
    method: str = "hutch++",
    *,
    generator: torch.Generator | None = None,
    return_result: Literal[False] = False,
) -> Tensor: ...


@overload
def trace(
    A,
    num_matvecs: int = 100,
    method: str = "hutch++",
    *,
    generator: torch.Generator | None = None,
    return_result: Literal[True],
) -> Estimate: ...


def trace(
    A,
    num_matvecs: int = 100,
    method: str = "hutch++",
    *,
    generator: torch.Generator | None = None,
    return_result: bool = False,
) -> Tensor | Estimate:
    r"""Estimate :math:`\mathrm{tr}(A)` from about ``num_matvecs`` products.

    * ``"hutchinson"``: :math:`\frac1m \sum_i z_i^\top A z_i` with Rademacher :math:`z_i`;
      unbiased, error :math:`O(\|A\|_F/\sqrt m)`.
    * ``"hutch++"`` (default; Meyer et al., 2021): a third of the budget finds the
      dominant range :math:`Q` of :math:`A S`, whose trace is taken exactly, and Hutchinson
      handles the rest; error :math:`O(1/m)` for matrices with decaying spectra.
    * ``"xtrace"`` (Epperly, Tropp & Webber, 2024): every probe serves both as a range
      sample and as a Hutchinson probe, by leave-one-out projections; exact for a symmetric
      matrix of rank below ``num_matvecs / 2 - 1``, and the most accurate of the three per
      product. It needs a symmetric operator: one that is not (declared, or found so from the
      kept products) raises ``ValueError``.
    * ``"exact"``: the sum of :math:`e_i^\top A e_i` over all ``n`` unit vectors (batched).
      ``"hutch++"`` and ``"xtrace"`` take it too when the budget covers the whole space.

    With ``return_result=True`` an :class:`Estimate` carries the standard error (from the
    spread of the Hutchinson terms, or of XTrace's exchangeable estimates; NaN from a single
    term), the products and the data passes.

    Args:
        A: a square :class:`~second.LinearOperator`, dense tensor or SciPy operator.
        num_matvecs: the budget of operator products.
        method: ``"hutch++"``, ``"hutchinson"``, ``"xtrace"`` or ``"exact"``.
        generator: the random generator of the probes. Default: a fresh one seeded from
            torch's global generator (``torch.manual_seed`` makes the estimate reproducible,
            and repeated calls draw new probes); for a curvature operator summed over a
            ``torch.distributed`` group, rank 0's seed on every rank.
        return_result: return an :class:`Estimate` instead of the value.

    Raises:
        ValueError: an unknown ``method``, ``num_matvecs < 1``, or ``"xtrace"`` on an operator
            that is not symmetric.

    Example:
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> float(trace(A, method="exact"))
        15.0
        >>> L = torch.randn(50, 3, dtype=torch.float64)
        >>> est = trace(L @ L.T, 10, method="xtrace", return_result=True)  # rank 3: exact
        >>> bool(torch.isclose(est.value, torch.trace(L @ L.T))), est.matvecs
        (True, 10)
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    g = _gen(generator, op)
    count = _Counter(op)
    zero = torch.zeros((), dtype=torch.float64)
    if method not in ("hutch++", "hutchinson", "xtrace", "exact"):
        raise ValueError(
            f"method must be 'hutch++', 'hutchinson', 'xtrace' or 'exact', got {method!r}"
        )
    if method != "exact" and num_matvecs < 1:
        raise ValueError("num_matvecs must be >= 1")
    if method == "exact" or (
        method in ("hutch++", "xtrace") and (num_matvecs >= 2 * n or _probes(num_matvecs) > n)
    ):
        # the budget covers the whole space: take the trace exactly
        value, err, used = torch.diagonal(_dense(op, count)).sum(), zero, "exact"
    elif method == "hutchinson":
        Z = _rademacher(n, num_matvecs, g, op.dtype, op.device)
        terms = (Z * count(Z)).sum(0).to(torch.float64)
        value, err, used = terms.mean().to(op.dtype), _sem(terms), method
    elif method == "hutch++":
        k = max(1, num_matvecs // 3)
        S = _rademacher(n, k, g, op.dtype, op.device)
        Q, _ = torch.linalg.qr(count(S))
        G = _rademacher(n, max(1, num_matvecs - 2 * k), g, op.dtype, op.device)
        G = project_off(G, Q)
        terms = (G * count(G)).sum(0).to(torch.float64)
        value = torch.trace(gram(Q, count(Q))).to(op.dtype) + terms.mean().to(op.dtype)
        err, used = _sem(terms), method
    else:
        _refuse_nonsymmetric(op, "xtrace")
        value, err = _xtrace(count, n, _probes(num_matvecs), g, op.dtype, op.device)
        used = method
    if not return_result:
        return value
    return Estimate(value, err, count.matvecs, count.passes, used)


def _probes(num_matvecs: int) -> int:
    """XTrace's and XDiag's Gaussian probes for a budget (each takes two products)."""
    return max(2, num_matvecs // 2)


def _refuse_nonsymmetric(op, method: str) -> None:
    """XTrace and XDiag need a symmetric operator: refuse one that declares otherwise."""
    if not getattr(op, "symmetric", True):
        raise ValueError(
            f"method={method!r} needs a symmetric operator (its leave-one-out formulas take "
            "A = A^T: biased otherwise, with a standard error that does not show it); this one "
            "is not symmetric: use method='hutchinson'"
            + (" or 'hutch++'" if method == "xtrace" else "")
        )


def _dense(op, count: _Counter) -> Tensor:
    """The dense matrix (its ``n`` products are counted by the operator itself)."""
    count.passes += 1
    return op.to_dense()


def _sem(terms: Tensor) -> Tensor:
    """The standard error of the mean of ``terms`` (NaN, unknown, for a single term)."""
    m = terms.shape[0]
    return terms.std(dim=0) / math.sqrt(m) if m > 1 else torch.full_like(terms[0], math.nan)


def _exchangeable_sketch(count: _Counter, n: int, m: int, g, dtype, device, what: str):
    """XTrace's and XDiag's shared sketch from ``m`` Gaussian probes (``2 m`` products).

    Returns ``(Omega, Q, R, S, A Q)``: the probes, ``A Omega = Q R``, the normalized columns
    of ``R^{-T}`` (each ``s_i`` spans the direction that leaving probe ``i`` out removes from
    the range), and the products with ``Q`` (all but ``Omega`` in float64).
    """
    Om = torch.randn(n, m, generator=g, dtype=dtype, device=device)
    Q, R = torch.linalg.qr(count(Om))
    Qd, Rd = Q.to(torch.float64), R.to(torch.float64)
    S = torch.linalg.inv(Rd).mT
    S = S / torch.linalg.vector_norm(S, dim=0)
    AQ = count(Q)
    # Q^T A Q is symmetric for a symmetric A (a free probe of a wrapped SciPy operator)
    check_symmetric_basis(Q, AQ, f"method={what!r}", dtype, "method='hutchinson'")
    return Om, Qd, Rd, S, AQ.to(torch.float64)


def _xtrace(count: _Counter, n: int, m: int, g, dtype, device) -> tuple[Tensor, Tensor]:
    """XTrace's exchangeable estimates from ``m`` Gaussian probes (``2 m`` products).

    For probe ``i``, ``Q_(i)`` is an orthonormal basis of ``A Omega`` without column ``i``
    (a rank-one downdate of ``Q``: the direction ``s_i``, the normalized ``i``-th column of
    ``R^{-T}``); estimate ``i`` is ``tr(Q_(i)^T A Q_(i)) + w^T (I - P_i) A (I - P_i) w`` with
    ``w = omega_i``, which is unbiased because ``omega_i`` is independent of ``Q_(i)``.
    """
    Om, Qd, Rd, S, Z = _exchangeable_sketch(count, n, m, g, dtype, device, "xtrace")
    H = Qd.T @ Z
    H = 0.5 * (H + H.T)
    W = Qd.T @ Om.to(torch.float64)  # Q^T omega_i
    c = (S * W).sum(0)  # s_i^T w_i
    sHs = (S * (H @ S)).sum(0)
    wHw = (W * (H @ W)).sum(0)
    wR = (W * Rd).sum(0)  # omega_i^T A omega_i = w_i^T R_i
    cross = (S * (Rd - H @ W)).sum(0)  # s_i^T (R_i - H w_i)
    ests = torch.trace(H) - sHs + (wHw - wR) + 2 * c * cross + c**2 * sHs
    return ests.mean().to(dtype), _sem(ests)


@overload
def diagonal(
    A,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    *,
    control: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_result: Literal[False] = False,
) -> Tensor: ...


@overload
def diagonal(
    A,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    *,
    control: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_result: Literal[True],
) -> Estimate: ...


def diagonal(
    A,
    num_matvecs: int = 100,
    method: str = "hutchinson",
    *,
    control: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_result: bool = False,
) -> Tensor | Estimate:
    r"""Estimate :math:`\mathrm{diag}(A)`.

    * ``"hutchinson"``: :math:`\frac1m \sum_i z_i \odot A z_i` (Bekas et al., 2007),
      Rademacher probes; unbiased, error per entry :math:`O(\|A_{i,:}\|/\sqrt m)`.
      With ``control=C`` (an operator or matrix whose diagonal is known exactly, e.g. the
      Gauss-Newton matrix for a Hessian), the estimate is :math:`\mathrm{diag}(C)` plus
      Hutchinson on :math:`A - C` (a control variate): the error shrinks with
      :math:`\|A - C\|` instead of :math:`\|A\|`; ``control`` may also be the exact
      diagonal of ``C`` with ``C`` itself as an operator via ``(C, diag_C)``. For a
      :class:`~second.HessianOperator`, ``control="ggn"`` uses the Gauss-Newton matrix of the
      same model and data, whose diagonal is exact (:func:`ggn_diagonal`): the Hessian's
      diagonal is then the GGN's plus an estimate of the (usually small) residual term.
    * ``"xdiag"`` (Epperly, Tropp & Webber, 2024): the exchangeable leave-one-out
      estimator, exact for a symmetric matrix of rank below ``num_matvecs / 2 - 1``; it
      needs a symmetric operator (biased otherwise), and takes the exact diagonal when the
      budget covers the whole space (``num_matvecs >= 2 n``).
    * ``"exact"``: from ``n`` batched unit-vector products (small models); for a
      :class:`~second.GGNOperator`, by :func:`ggn_diagonal` instead (one backward pass per
      output dimension, any number of parameters). Where :func:`ggn_diagonal` does not apply
      (a loss other than ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss``; a model
      whose batch norm couples the examples) a warning says so and the ``n`` products are
      taken.

    With ``return_result=True`` an :class:`Estimate` carries per-entry standard errors
    (NaN from a single probe).

    Args:
        A: a square :class:`~second.LinearOperator`, dense tensor or SciPy operator.
        num_matvecs: the budget of operator products (randomized methods).
        method: ``"hutchinson"``, ``"xdiag"`` or ``"exact"``.
        control: a control variate for ``"hutchinson"`` (see above).
        generator: the random generator of the probes. Default: a fresh one seeded from
            torch's global generator (``torch.manual_seed`` makes the estimate reproducible,
            and repeated calls draw new probes); for a curvature operator summed over a
            ``torch.distributed`` group, rank 0's seed on every rank.
        return_result: return an :class:`Estimate` instead of the value.

    Raises:
        ValueError: an unknown ``method``; ``num_matvecs < 1`` for a randomized one;
            ``"xdiag"`` on an operator that is not symmetric; ``control="ggn"`` on a model
            whose batch norm couples the examples.
        NotImplementedError: ``control="ggn"`` with a loss :func:`ggn_diagonal` does not
            factorize.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> diagonal(A, method="exact")
        tensor([2., 3.], dtype=torch.float64)
    """
    op = aslinearoperator(A)
    n = op.shape[0]
    count = _Counter(op)
    if method not in ("hutchinson", "xdiag", "exact"):
        raise ValueError(f"method must be 'hutchinson', 'xdiag' or 'exact', got {method!r}")
    if method != "exact" and num_matvecs < 1:
        raise ValueError("num_matvecs must be >= 1")
    if method == "xdiag" and (num_matvecs >= 2 * n or _probes(num_matvecs) > n):
        method = "exact"  # the budget covers the whole space: take the diagonal exactly
    model_diag = _model_ggn(op) if method == "exact" else None
    if model_diag is not None:
        value, err = model_diag, torch.zeros_like(model_diag)
    elif method == "exact":
        value = torch.diagonal(_dense(op, count)).clone()
        err = torch.zeros_like(value)
    else:
        g = _gen(generator, op)
        if method == "xdiag":
            _refuse_nonsymmetric(op, "xdiag")
            value, err = _xdiag(count, n, _probes(num_matvecs), g, op.dtype, op.device)
        else:
            Z = _rademacher(n, num_matvecs, g, op.dtype, op.device)
            AZ = count(Z)
            base = None
            if isinstance(control, str):
                control = _named_control(op, control)
            if control is not None:
                C, base = control if isinstance(control, tuple) else (control, None)
                Cop = aslinearoperator(C, n, dtype=op.dtype, device=op.device)
                if base is None:
                    base = torch.diagonal(Cop.to_dense()).clone()
                AZ = AZ - (Cop @ Z if Z.shape[1] > 1 else (Cop @ Z[:, 0]).unsqueeze(1))
            terms = (Z * AZ).to(torch.float64)
            value = terms.mean(dim=1).to(op.dtype) + (0 if base is None else base)
            err = _sem(terms.T)
    if not return_result:
        return value
    return Estimate(value, err, count.matvecs, count.passes, method)


def _model_ggn(op) -> Tensor | None:
    """The exact GGN diagonal of a GGN operator over a model, by per-example products.

    ``None`` (the caller takes the dense diagonal) for another operator, and, with a
    warning, for a loss or model :func:`ggn_diagonal` cannot take.
    """
    from ..operators import GGNOperator
    from ._diagonal import ggn_diagonal, unsupported_reason

    if type(op) is not GGNOperator:
        return None
    why = unsupported_reason(op.model, op.loss_fn)
    if why is not None:
        warnings.warn(
            f"diagonal(method='exact'): {why}. Taking the diagonal from the operator's "
            f"{op.shape[0]} unit-vector products instead.",
            UserWarning,
            stacklevel=3,
        )
        return None
    return ggn_diagonal(op.model, op.loss_fn, op.data, op.params, **_options_of(op))


def _options_of(op) -> dict:
    """The options a curvature operator's model quantities share: reduction, task, ranks."""
    return {"reduction": op.reduction, "task": op.task, "distributed": op.distributed}


def _named_control(op, name: str):
    """``control="ggn"`` for a Hessian operator: the GGN of the same model, with its diagonal."""
    from ..operators import GGNOperator, HessianOperator

    if name != "ggn" or not isinstance(op, HessianOperator):
        raise ValueError(
            f"control={name!r}: the named control variate is 'ggn', for a HessianOperator"
        )
    from ._diagonal import ggn_diagonal, refuse_unsupported, unsupported_reason

    try:
        refuse_unsupported(op.model, op.loss_fn)
    except (ValueError, NotImplementedError) as err:
        raise type(err)(
            f"control='ggn' needs the GGN's exact diagonal, which ggn_diagonal cannot give: "
            f"{unsupported_reason(op.model, op.loss_fn)}. Pass control=(C, diag_C) with a "
            "control whose diagonal you have, or no control"
        ) from err
    G = GGNOperator(op.model, op.loss_fn, op.data, op.params, **_options_of(op))
    return G, ggn_diagonal(G.model, G.loss_fn, G.data, G.params, **_options_of(G))


def _xdiag(count: _Counter, n: int, m: int, g, dtype, device) -> tuple[Tensor, Tensor]:
    """XDiag's exchangeable estimates from ``m`` Gaussian probes (``2 m`` products).

    ``diag(A) = diag(P_i A) + diag((I - P_i) A)`` with ``P_i`` the leave-one-out projector
    of XTrace; the first term is exact from the kept products, the second is estimated by
    ``omega_i * ((I - P_i) A omega_i) = (s_i^T R_i) omega_i * (Q s_i)``.
    """
    Om, Qd, Rd, S, Z = _exchangeable_sketch(count, n, m, g, dtype, device, "xdiag")
    QS, ZS = Qd @ S, Z @ S
    c = (S * Rd).sum(0)  # s_i^T R_i
    base = (Qd * Z).sum(1)  # diag(Q Q^T A)
    ests = base.unsqueeze(1) - QS * ZS + c * Om.to(torch.float64) * QS  # [n, m]
    return ests.mean(1).to(dtype), _sem(ests.T)


@overload
def frobenius_norm(
    A,
    num_matvecs: int = 30,
    *,
    generator: torch.Generator | None = None,
    return_result: Literal[False] = False,
) -> Tensor: ...


@overload
def frobenius_norm(
    A,
    num_matvecs: int = 30,
    *,
    generator: torch.Generator | None = None,
    return_result: Literal[True],
) -> Estimate: ...


def frobenius_norm(
    A,
    num_matvecs: int = 30,
    *,
    generator: torch.Generator | None = None,
    return_result: bool = False,
) -> Tensor | Estimate:
    r"""Estimate :math:`\|A\|_F` from :math:`\|A\|_F^2 = \mathbb E\|A z\|^2` (Gaussian z).

    The relative error of :math:`\|A\|_F^2` is about :math:`\sqrt{2/m}\,\|A^\top A\|_F /
    \|A\|_F^2`; the standard error reported is that of the square root (delta method; NaN
    from a single probe).

    Args:
        A: a :class:`~second.LinearOperator`, dense tensor or SciPy operator.
        num_matvecs: the number of Gaussian probes (one product each).
        generator: the random generator of the probes. Default: a fresh one seeded from
            torch's global generator (``torch.manual_seed`` makes the estimate reproducible,
            and repeated calls draw new probes); for a curvature operator summed over a
            ``torch.distributed`` group, rank 0's seed on every rank.
        return_result: return an :class:`Estimate` instead of the value.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 4.0], dtype=torch.float64))
        >>> est = frobenius_norm(A, 2000, return_result=True)
        >>> abs(float(est.value) - 5.0) < 4 * float(est.std_error)
        True
    """
    op = aslinearoperator(A)
    if num_matvecs < 1:
        raise ValueError("num_matvecs must be >= 1")
    count = _Counter(op)
    g = _gen(generator, op)
    Z = torch.randn(op.shape[1], num_matvecs, generator=g, dtype=op.dtype, device=op.device)
    terms = (count(Z).to(torch.float64) ** 2).sum(0)
    sq = terms.mean()
    value = sq.sqrt()
    err = _sem(terms) / (2 * value) if float(value) > 0 else torch.zeros_like(value)
    if not return_result:
        return value.to(op.dtype)
    return Estimate(value.to(op.dtype), err, count.matvecs, count.passes, "hutchinson")
