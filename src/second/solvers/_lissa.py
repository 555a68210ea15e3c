r"""LiSSA: the Neumann series of ``_neumann.py`` over sampled mini-batch curvature.

:math:`A^{-1} = \frac1s \sum_{i \ge 0} (I - A/s)^i` with each product taken by a random
mini-batch's curvature :math:`A_i` (sampled so that its expectation is :math:`A`), and
:math:`d` terms kept: the truncation bias is up to :math:`q^d` relative, :math:`q` the
contraction :math:`\max(|1 - \lambda_{\min}/s|, |1 - \lambda_{\max}/s|)`.
:func:`lissa_recursion` is the recursion itself, which :class:`second.optim.LiSSA` runs too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .._deprecation import renamed_property
from ..operators.base import LinearOperator, aslinearoperator
from ..spectral.lanczos import extreme_eigenvalues
from ._result import Problem, SolveResult, column_norms, report

__all__ = ["lissa", "lissa_recursion", "LissaRecursion"]


@dataclass
class _Batches:
    """LiSSA's mini-batch operators and how to sample them so that ``E[factor A_i] = A``.

    ``get(i)`` is the operator of mini-batch ``i``; ``count`` the number of mini-batches
    (``None`` for a user's function without ``num_batches``: ``i`` is then a random sample
    index, a seed); ``cdf`` the cumulative sampling probabilities (``None``: uniform);
    ``factor`` multiplies every sampled product.
    """

    get: Callable[[int], LinearOperator]
    count: int | None
    cdf: Tensor | None = None
    factor: float = 1.0

    def draw(self, g: torch.Generator) -> int:
        """A random mini-batch index, drawn with the sampling probabilities."""
        if self.count is None:
            return int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=g.device))
        u = float(torch.rand(1, generator=g, dtype=torch.float64, device=g.device))
        if self.cdf is None:
            return min(int(u * self.count), self.count - 1)
        at = torch.searchsorted(self.cdf, torch.tensor([u], dtype=torch.float64), right=True)
        return min(int(at), self.count - 1)

    def indices(self, k: int) -> list[int]:
        """The first ``k`` mini-batches that can be sampled (for the scale estimate)."""
        if self.count is None:
            return list(range(k))
        if self.cdf is None:
            return list(range(min(k, self.count)))
        p = torch.diff(self.cdf, prepend=self.cdf.new_zeros(1))
        return (p > 0).nonzero().flatten()[:k].tolist()


_INDEX_HINT = (
    "lissa calls a function A with random sample indices i in [0, 2**31 - 1) (a seed for "
    "its own mini-batch) unless num_batches=B is given, which draws i uniformly from "
    "0..B-1; pass num_batches, or a list of operators"
)


def _batch_operators(A, num_batches: int | None = None) -> _Batches:
    r"""LiSSA's stochastic products: the mini-batch operators and their sampling.

    A :class:`~second.CurvatureOperator` over several batches is
    :math:`A = \sum_b c_b A_b` with :math:`A_b` = ``A.restrict(batch b)``, the batch's own
    mean (or sum): :math:`c_b = W_b / W` for a mean (:math:`W_b` what torch's mean divides
    batch :math:`b` by; a batch whose every target is ignored weighs 0) and :math:`c_b = 1`
    for a sum. Batch :math:`b` is sampled with probability :math:`c_b / C`, :math:`C =
    \sum_b c_b`, and its product multiplied by :math:`C` (1 for a mean, the number of
    batches for a sum), so :math:`E[C A_i] = A`. Of the unbiased schemes this is the one
    of least variance when the batch curvatures are alike (importance sampling by weight;
    uniform sampling reweighted by :math:`B c_b` has the larger second moment
    :math:`B \sum_b c_b^2 \ge C^2` by Cauchy-Schwarz), and every sampled operator is
    :math:`C A_b`, a curvature of the operator's own size, so one scale fits them all.
    """
    from ..data import iterate_batches
    from ..operators.curvature import CurvatureOperator

    if num_batches is not None and not (
        callable(A) and not isinstance(A, (LinearOperator, Tensor, list, tuple))
    ):
        raise ValueError("num_batches is for a function i -> operator; A is not one")
    if isinstance(A, CurvatureOperator):
        if A.single_batch:
            return _Batches(lambda i: A, 1)
        from .. import distributed as dist

        if dist.active(A.distributed):
            # each rank would sample its own shard's batches: the expected operator would be
            # that rank's curvature, not the whole dataset's, and the ranks' answers would differ
            raise ValueError(
                "lissa samples the mini-batches of one process: on a CurvatureOperator summed "
                "over a torch.distributed group (each rank a shard) it would solve each rank's "
                "own system. Use cg or minres, whose products are reduced over the ranks, or "
                "pass distributed=False to solve with this rank's data alone"
            )
        # the same operator (kind and options: a Fisher's samples, columns, ...) on each batch
        batches = list(iterate_batches(A.data, A.task, A.device))
        c = A.batch_shares(batches)
        total = float(c.sum())
        ops: list[LinearOperator | None] = [None] * len(batches)

        def get(i: int) -> LinearOperator:
            op_i = ops[i]
            if op_i is None:
                op_i = ops[i] = A.restrict(batches[i])
            return op_i

        p = c / total
        uniform = bool((p.max() - p.min()) <= 1e-12 * p.max())
        cdf = None if uniform else torch.cumsum(p, 0)
        if cdf is not None:
            cdf[-1] = 1.0
        return _Batches(get, len(batches), cdf, total)
    if isinstance(A, (list, tuple)):
        listed = [aslinearoperator(a) for a in A]
        if not listed:
            raise ValueError("lissa got an empty list of operators")
        return _Batches(lambda i: listed[i], len(listed))
    if callable(A) and not isinstance(A, (LinearOperator, Tensor)):
        if num_batches is not None and int(num_batches) < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")

        def call(i: int) -> LinearOperator:
            try:
                return A(i)
            except (IndexError, KeyError) as e:
                raise ValueError(f"A({i}) raised {type(e).__name__}: {e}. {_INDEX_HINT}") from e

        return _Batches(call, None if num_batches is None else int(num_batches))
    op = aslinearoperator(A)
    return _Batches(lambda i: op, 1)


def _extremes(A, steps: int, generator) -> tuple[float, float, int]:
    """Lanczos ``(lambda_min, lambda_max)`` estimates and the products they took."""
    op = aslinearoperator(A)
    before = op.matvecs
    lo, hi = extreme_eigenvalues(op, steps=steps, generator=generator)
    return lo, hi, op.matvecs - before


_GROWTH_SLACK = 10.0  # LiSSA's guard: ||p_j|| <= 10 (j + 1) ||b|| (a contraction gives 1x)


@dataclass
class LissaRecursion:
    r"""What :func:`lissa_recursion` returns.

    Attributes:
        x: the averaged estimate :math:`\frac{1}{R}\sum_r p^{(r)}_d / s` (``None`` when the
            recursion diverged).
        matvecs: curvature products made (``products`` is its deprecated spelling).
        diverged: ``(j, ||p_j||)`` at the first term that broke the guard or was not finite
            (``None`` when none did).
    """

    x: Tensor | None
    matvecs: int
    diverged: tuple[int, float] | None = None

    products = renamed_property("products", "matvecs")


def lissa_recursion(
    b: Tensor,
    product: Callable[[Tensor], Tensor],
    *,
    depth: int,
    scale: float,
    damping: float = 0.0,
    repeats: int = 1,
    bound: Callable[[int], float] | None = None,
    tick: Callable[[], object] | None = None,
) -> LissaRecursion:
    r"""LiSSA's stochastic Neumann recursion, the one implementation of it.

    .. math:: p_0 = b, \qquad p_{j+1} = b + \Big(I - \frac{A_{i_j} + \lambda I}{s}\Big) p_j,
              \qquad x = \frac1R \sum_{r=1}^{R} p^{(r)}_{\mathrm{depth}} / s,

    where each call of ``product`` applies a freshly sampled curvature :math:`A_{i_j}`.
    :func:`lissa` (the solver) and :class:`second.optim.LiSSA` (the optimizer) both run it.

    Args:
        b: the right-hand side (flat).
        product: ``p -> A_i p`` for a fresh sample ``i`` on every call.
        depth: terms per estimate.
        scale: :math:`s`.
        damping: :math:`\lambda \ge 0`.
        repeats: independent estimates averaged.
        bound: ``j -> largest admissible ||p_j||`` (a divergence guard; default none: only
            non-finite terms stop the recursion).
        tick: called once per product (a progress bar).

    Returns:
        A :class:`LissaRecursion`.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> r = lissa_recursion(torch.ones(2, dtype=torch.float64), lambda p: A @ p, depth=200, scale=2.5)
        >>> torch.allclose(r.x, torch.tensor([1.0, 0.5], dtype=torch.float64)), r.matvecs
        (True, 200)
    """
    acc = torch.zeros_like(b)
    matvecs = 0
    for _ in range(repeats):
        p = b.clone()
        for j in range(depth):
            if tick is not None:
                tick()
            Ap = product(p)
            matvecs += 1
            if damping:
                Ap = Ap + damping * p
            p = b + p - Ap / scale
            norm = float(torch.linalg.vector_norm(p))
            limit = math.inf if bound is None else bound(j + 1)
            if not norm <= limit:  # also catches a non-finite term
                return LissaRecursion(None, matvecs, (j + 1, norm))
        acc += p / scale
    return LissaRecursion(acc / repeats, matvecs)


def lissa(
    A: LinearOperator | Sequence[LinearOperator] | Callable[[int], LinearOperator],
    b,
    *,
    depth: int | None = None,
    repeats: int = 1,
    scale: float | None = None,
    damping: float = 0.0,
    tol: float = 1e-3,
    full_operator: LinearOperator | None = None,
    lanczos_steps: int = 20,
    bias_warning: float = 0.05,
    max_depth: int = 100_000,
    scale_batches: int = 4,
    generator: torch.Generator | None = None,
    progressbar: bool | None = None,
    warn: bool = True,
    num_batches: int | None = None,
) -> SolveResult:
    r"""LiSSA: a stochastic Neumann series over mini-batch curvature (Agarwal et al., 2016).

    Recursion, repeated ``repeats`` times with fresh mini-batches and averaged:
    :math:`p_0 = b,\ p_{j+1} = b + (I - (A_{i_j} + \lambda I)/s)\, p_j`, :math:`x = p_{d}/s`,
    where :math:`A_{i_j}` is the curvature of a random mini-batch.

    ``A`` is one of:

    - a :class:`~second.CurvatureOperator` over an iterable of batches: the operator per
      batch is ``A.restrict(batch)``, the batch's own mean (or sum), and batch :math:`b` is
      drawn with probability :math:`W_b / W` (its share of torch's mean loss on all the
      data; a batch whose every target is ignored is never drawn) for a mean, uniformly
      and its product multiplied by the number of batches for a sum, so the expected
      product is the operator's (sampling by weight has the least variance of the unbiased
      schemes when the batch curvatures are alike, and keeps every sampled operator at the
      full operator's size, so one scale fits them all);
    - a list of operators: the operator is their mean, each drawn uniformly;
    - a function ``i -> operator``: with ``num_batches=B`` the operator is the mean of
      ``A(0), ..., A(B-1)``, ``i`` drawn uniformly from them; without it ``i`` is a random
      sample index in :math:`[0, 2^{31})` (a seed from which the function draws its own
      mini-batch; ``A(0), ..., A(scale_batches - 1)`` are also called for the scale). A
      function that raises ``IndexError`` or ``KeyError`` on such an index is reported with
      this hint (``ValueError``).

    ``scale=None`` takes :math:`s = 1.05 \max(\lambda_{\max}(A), \max_i \lambda_{\max}(A_i)) +
    \lambda` over the full operator and the first ``scale_batches`` mini-batch operators
    (Lanczos estimates): a mini-batch with curvature above :math:`2s` would make the
    recursion expand.

    Truncation bias: after ``depth`` terms the deterministic part of the error is
    :math:`\|(I - (A+\lambda I)/s)^{d} A^{-1} b\|`, up to :math:`q^d` relative with
    :math:`q = 1 - (\lambda_{\min} + \lambda)/s`. Scale and contraction are estimated by
    Lanczos on ``full_operator`` (default: ``A`` itself when it is one operator, else the
    first batch's). ``depth=None`` chooses :math:`d = \lceil \ln(\mathrm{tol}) / \ln q \rceil`
    (capped at ``max_depth``). A fixed depth that leaves :math:`q^d >` ``tol`` is not
    converged and warns (:class:`~second.ConvergenceWarning`); above ``bias_warning`` the
    message also says which fraction of the solution's slowest component is missing (the
    silent failure where LiSSA at default settings returns a fraction of the true
    magnitude).

    A ``scale`` at or below :math:`\lambda_{\max}/2` (contraction :math:`q \ge 1`) makes
    the recursion diverge: it is not run, and the result (``x = 0``) is flagged
    ``diverged`` with a warning. A run whose partial sums grow past :math:`10 (j + 1)
    \|b\|` (a mini-batch curvature above :math:`2s`, or indefinite) is stopped and
    flagged the same way.

    Under ``torch.distributed``, a :class:`~second.CurvatureOperator` over several batches
    that is summed over the ranks (each rank a shard) is refused (``ValueError``): LiSSA
    samples the batches of one process, so it would solve each rank's own system. Use
    :func:`~second.cg` or :func:`~second.minres` (their products are reduced over the ranks).
    A single-batch operator is used whole (its products are reduced) and works.

    ``converged`` means the predicted bias :math:`q^d \le` ``tol``; the stochastic error is
    not bounded by it (average more ``repeats``). ``info`` holds scale, contraction, depth
    and ``predicted_bias``. ``matvecs`` counts every product, the Lanczos estimates' too.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> res = lissa([A], torch.ones(2, dtype=torch.float64), tol=1e-8)
        >>> torch.allclose(res.x, torch.tensor([1.0, 0.5], dtype=torch.float64))
        True
    """
    batches = _batch_operators(A, num_batches)
    get = batches.get
    first = A if isinstance(A, LinearOperator) else get(batches.indices(1)[0])
    ref = full_operator if full_operator is not None else first
    pb = Problem(
        first, b, None, damping, method="lissa", allow_complex=False, allow_negative_damping=False
    )
    info: dict = {}
    lo, hi, setup_matvecs = _extremes(ref, lanczos_steps, generator)
    lo_d, hi_d = lo + damping, hi + damping
    info.update(lambda_min_estimate=lo_d, lambda_max_estimate=hi_d)

    def refuse(message: str, products: int = 0, **flags) -> SolveResult:
        res = pb.result(
            torch.zeros_like(pb.vector),
            converged=False,
            iterations=products,
            residual_norms=[],
            diverged=True,
            method="lissa",
            info=info,
            message=message,
            **flags,
        )
        res.matvecs = products + setup_matvecs
        return report(res, warn)

    if lo_d <= 0:
        info.update(warn_negative=True)
        return refuse(
            f"the damped operator is not positive definite (eigenvalue ~ {lo_d:.3e}): "
            f"LiSSA diverges; add damping >= {-lo:.3e}",
            negative_curvature=True,
        )
    if scale is None:
        # every mini-batch operator must contract too: bound the largest batch eigenvalue
        # (distinct operators only: a single operator was estimated above)
        distinct = {id(o): o for o in (get(i) for i in batches.indices(scale_batches))}
        distinct.pop(id(ref), None)
        batch_max = hi
        for o in distinct.values():
            _, hi_o, used = _extremes(o, lanczos_steps, generator)
            batch_max = max(batch_max, batches.factor * hi_o)  # the sampled operator: C A_i
            setup_matvecs += used
        scale = 1.05 * (batch_max + damping)
        info["batch_lambda_max_estimate"] = batch_max + damping
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    q = max(1 - lo_d / scale, abs(1 - hi_d / scale))
    info.update(scale=float(scale), contraction=q)
    if q >= 1:
        return refuse(
            f"scale {scale:.3e} is below lambda_max / 2 ~ {hi_d / 2:.3e} (contraction "
            f"{q:.4f} >= 1): the recursion diverges; pass scale >= {1.05 * hi_d:.3e}, or "
            "scale=None to estimate it"
        )
    if depth is None:
        depth = min(max_depth, math.ceil(math.log(max(tol, 1e-300)) / math.log(max(q, 1e-300))))
        depth = max(depth, 1)
    depth = int(depth)
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    bias = q**depth
    info.update(depth=depth, predicted_bias=bias)
    g = generator or torch.Generator(device=pb.vector.device).manual_seed(0)
    steps: Iterable[int] = range(repeats * depth)
    if progressbar is not False:
        from .._progress import progress

        steps = progress(steps, desc="lissa", unit="product", enabled=progressbar)
    it = iter(steps)
    factor = batches.factor

    def sample_product(p):
        Ap = get(batches.draw(g)) @ p
        return Ap if factor == 1.0 else factor * Ap

    bnorm = float(column_norms(pb.vector.unsqueeze(1))[0])
    rec = lissa_recursion(
        pb.vector,
        sample_product,
        depth=depth,
        scale=scale,
        damping=damping,
        repeats=repeats,
        bound=lambda j: _GROWTH_SLACK * (j + 1) * bnorm,
        tick=lambda: next(it),
    )
    counter = rec.matvecs
    if rec.diverged is not None:
        j, norm = rec.diverged
        return refuse(
            f"the recursion diverged (||p_{j}|| = {norm:.3e} > {_GROWTH_SLACK:g} (j + 1) ||b|| "
            f"= {_GROWTH_SLACK * (j + 1) * bnorm:.3e}): a mini-batch curvature exceeds "
            f"2 * scale = {2 * scale:.3e} or is indefinite; raise scale or damping",
            counter,
        )
    assert rec.x is not None  # the recursion did not diverge
    converged = bias <= tol
    msg = (
        f"depth {depth}, scale {scale:.3e}, contraction {q:.6f}: predicted truncation bias "
        f"{bias:.2e}"
    )
    if converged:
        msg += f" <= tol {tol:.1e} (the stochastic error is not bounded by it)"
    else:
        msg += f" > tol {tol:.1e}"
        if bias > bias_warning:
            msg += f": ~{100 * bias:.0f}% of the solution's slowest component is missing"
        msg += f"; use depth >= {math.ceil(math.log(max(tol, 1e-300)) / math.log(max(q, 1e-300)))}, depth=None or more damping"
    res = pb.result(
        rec.x,
        converged=converged,
        iterations=counter,
        residual_norms=[],
        method="lissa",
        info=info,
        message=msg,
    )
    res.matvecs = counter + setup_matvecs
    return report(res, warn)
