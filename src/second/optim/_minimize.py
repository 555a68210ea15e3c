r"""``second.minimize``: a SciPy-shaped functional entry point on the Newton core."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor

from .._deprecation import renamed_keyword
from ..newton.least_squares import gauss_newton
from ..newton.loop import newton_cg, newton_dense
from ..newton.result import OptimizeResult
from ..newton.stopping import Criteria
from ._options import check_int, check_nonneg, check_positive, check_unit

__all__ = [
    "minimize",
    "OptimizeResult",
    "METHODS",
    "AUTO_DENSE_MAX",
    "AUTO_SWITCH_MATVECS",
    "default_maxiter",
]

METHODS = ("auto", "newton-cg", "newton-exact", "dense", "gauss-newton", "lm")

#: ``method="auto"`` runs dense Newton up to this many unknowns, matrix-free Newton-CG above.
#: Measured with ``benchmarks/bench_newton.py --auto-threshold`` (see BENCHMARKS.md): on
#: digits MLPs (L2 1e-3) Newton-CG is faster from n = 85 (0.61 vs 0.93 CPU s; 0.62 vs 2.52
#: at n = 160, 0.42 vs 11.2 at n = 610), while at n = 100 dense Newton solves the
#: condition-1e8 quadratic in 0.01 s against Newton-CG's 2.5 s and gets furthest on the
#: teacher-student network: dense up to 100 unknowns, where it costs at most ~1.5x.
AUTO_DENSE_MAX = 100

#: Up to :data:`AUTO_DENSE_MAX` unknowns, ``"auto"`` starts matrix-free and runs dense Newton
#: from ``x0`` instead once Newton-CG has spent this many Hessian-vector products per unknown
#: without converging: where CG needs a product or two per step (Rosenbrock-100: 46 in 40
#: iterations) the matrix-free route is the fastest, where it needs many (an ill-conditioned
#: quadratic, the teacher-student network) the dense one is; a small budget keeps the
#: iterations of an unbounded problem few (BENCHMARKS.md).
AUTO_SWITCH_MATVECS = 0.5
#: ... and at least this many products (a tiny problem's trust region needs a few steps to grow).
AUTO_SWITCH_MIN = 40

#: Dense Newton continues from Newton-CG's point if ``||x||`` stayed within this factor of
#: ``max(1, ||x0||)``, ``f`` went down and ``||grad||`` fell below :data:`AUTO_RESTART_GRAD`
#: of its initial value (Newton-CG nearly there), else it restarts from ``x0`` (a diverging
#: problem's unbounded test then sees the whole run).
AUTO_RESTART_GROWTH = 4.0
AUTO_RESTART_GRAD = 1e-3

_CORE_OPTIONS = {
    "newton-cg": {
        "globalization",
        "preconditioner",
        "memory",
        "cg_maxiter",
        "forcing",
        "initial_radius",
        "max_radius",
        "eta",
        "warm_start",
        "reorthogonalize",
    },
    "newton-exact": {
        "initial_radius",
        "eta",
        "hessian_every",
        "reuse_tol",
        "rcond",
        "negligible",
    },
}
_GN_OPTIONS = {
    "damping_rule",
    "solver",
    "damping",
    "initial_radius",
    "eta",
    "cg_maxiter",
    "min_damping",
    "max_damping",
    "reorthogonalize",
}
_CRITERIA_OPTIONS = {"xtol", "detect_unbounded", "unbounded_factor", "unbounded_window"}


def _check_options(options: dict) -> None:
    """Raise ``ValueError`` for a numeric option out of its range (those present, not ``None``).

    A bad value otherwise fails silently (``cg_maxiter=0`` meant the default) or late, with a
    message about something else (``eta=2`` rejected every step until ``maxiter``).
    """
    opts = {k: v for k, v in options.items() if v is not None}
    for name in ("cg_maxiter", "unbounded_window", "hessian_every"):
        if name in opts:
            check_int(name, opts[name])
    if "memory" in opts:
        check_int("memory", opts["memory"], minimum=1)  # L-BFGS pairs; preconditioner=None for none
    if "eta" in opts:
        check_unit("eta", opts["eta"])
    forcing = opts.get("forcing")
    if forcing is not None and not (isinstance(forcing, str) and forcing == "eisenstat-walker"):
        if isinstance(forcing, str):
            raise ValueError(
                f"forcing must be 'eisenstat-walker' or a number in (0, 1), got {forcing!r}"
            )
        check_unit("forcing", forcing)
    for name in ("initial_radius", "unbounded_factor", "max_damping"):
        if name in opts:
            check_positive(name, opts[name])
    if "max_radius" in opts:
        r = opts["max_radius"]
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0:
            raise ValueError(f"max_radius must be a number > 0 (inf allowed), got {r!r}")
    for name in ("xtol", "damping", "min_damping", "reuse_tol", "rcond", "negligible"):
        if name in opts:
            check_nonneg(name, opts[name])
    if (
        "min_damping" in opts
        and "max_damping" in opts
        and opts["min_damping"] > opts["max_damping"]
    ):
        raise ValueError(
            f"min_damping ({opts['min_damping']!r}) must not exceed max_damping "
            f"({opts['max_damping']!r})"
        )


def default_maxiter(n: int) -> int:
    """The default iteration limit of :func:`minimize`: ``max(1000, 20 n)`` for ``n`` unknowns.

    Newton-type methods need more iterations on larger nonconvex problems (Rosenbrock in
    ``n`` dimensions walks its valley in ``O(n)`` steps), so a fixed limit stops big problems
    early.

    Example:
        >>> default_maxiter(10), default_maxiter(100)
        (1000, 2000)
    """
    return max(1000, 20 * int(n))


def minimize(
    fun: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]],
    x0: Tensor,
    method: str = "auto",
    *,
    gtol: float | None = None,
    maxiter: int | None = None,
    max_time: float | None = None,
    options: dict | None = None,
    tol: float | None = None,
) -> OptimizeResult:
    r"""Minimize a function of one tensor with a Newton-type method.

    Methods:
    * ``"auto"`` (default): ``"newton-cg"`` above :data:`AUTO_DENSE_MAX` unknowns; up to
      it, ``"newton-cg"`` until it has spent :data:`AUTO_SWITCH_MATVECS` times ``n``
      Hessian-vector products, then ``"newton-exact"`` from ``x0`` (``result.method`` is
      ``"newton-cg"`` or ``"newton-cg, then newton-exact"``; every product and iteration of
      both counts). Dense Newton continues from Newton-CG's point when that is nearly a
      solution, else it restarts from ``x0``, so it may converge to another (possibly
      higher) local minimum than Newton-CG alone would; when it stops without converging
      above the value Newton-CG reached, the result is Newton-CG's point (the message says
      so). With ``options``, the size
      alone chooses (``"newton-exact"`` up to :data:`AUTO_DENSE_MAX`).
    * ``"newton-cg"``: matrix-free trust-region Newton (:func:`second.newton.newton_cg`):
      Steihaug-Toint CG on Hessian-vector products with Eisenstat-Walker forcing terms and
      an L-BFGS preconditioner; ``options=dict(globalization="line-search")`` uses
      warm-started truncated CG with a strong-Wolfe line search instead.
    * ``"newton-exact"`` (alias ``"dense"``): dense trust-region Newton
      (:func:`second.newton.newton_dense`, ``n`` batched products per iteration, the exact
      subproblem: an eigenvalue shift for indefinite Hessians); option ``hessian_every=m``
      reuses the Hessian for up to ``m`` accepted steps; ``rcond`` and ``negligible`` set
      how eigenvalues at the rounding level are treated (see
      :func:`second.newton.newton_dense`).
    * ``"gauss-newton"`` (alias ``"lm"``): Levenberg-Marquardt on the core
      (:func:`second.newton.gauss_newton`): Moré's trust-region damping (default,
      ``damping_rule="more"``) or Nielsen's (``"nielsen"``), dense or CG inner solves
      (``solver="auto"/"dense"/"cg"``). ``fun(x)`` returns a residual vector
      :math:`r(x)` (objective :math:`\tfrac12\|r\|^2`, Gauss-Newton matrix :math:`J^\top J`)
      or a pair ``(loss, output)`` (matrix :math:`J^\top (\nabla^2_{\mathrm{output}}
      \mathrm{loss}) J`).

    Stopping rule: :math:`\|\nabla f(x)\|_2 \le` ``gtol`` (``converged``); or diverging
    iterates (``status="unbounded"``: :math:`\|x\|` grew ``unbounded_factor``-fold (default
    10) over :math:`\max(1, \|x_0\|)` and at each of the last ``unbounded_window`` (10)
    accepted steps while ``f`` levelled off or fell ever faster, which says the objective is
    unbounded below or its infimum is not attained; see
    :class:`~second.newton.Criteria`); or ``maxiter`` iterations, ``max_time`` seconds, or
    a stalled method (step or radius below ``xtol``). A NaN objective is never a success.
    ``maxiter=0`` evaluates ``fun`` at ``x0`` exactly as the method's iteration 0 does.
    ``fun`` must be computed from ``x`` by torch operations: a value with no autograd path
    to ``x`` (``x.detach()``, a ``float()`` round trip) raises ``ValueError``.

    Args:
        fun: the objective (see the methods for what it returns).
        x0: starting point (any shape; float64 recommended).
        method: one of :data:`METHODS` (default ``"auto"``).
        gtol: gradient-norm tolerance (default 1e-6).
        maxiter: iteration limit (default ``max(1000, 20 n)``).
        max_time: wall-clock limit in seconds (default none).
        options: method options (e.g. ``globalization``, ``preconditioner``, ``cg_maxiter``,
            ``initial_radius``, ``hessian_every``, ``damping_rule``, ``damping``, ``solver``,
            ``reorthogonalize``) and stopping options
            (``xtol``, ``detect_unbounded``, ``unbounded_factor``, ``unbounded_window``).
        tol: deprecated spelling of ``gtol``.

    Returns:
        An :class:`~second.newton.OptimizeResult` (``converged``, ``status``, ``message``,
        ``method``, ``nit``, ``nfev``, ``ngev``, ``matvecs``, ...).

    Raises:
        ValueError: an unknown method or option, an option or tolerance out of range, a
            ``fun`` of the wrong form, or one with no autograd path to ``x``.

    Example:
        >>> def rosen(x):
        ...     return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        >>> res = minimize(rosen, torch.tensor([-1.2, 1.0], dtype=torch.float64), gtol=1e-8)
        >>> res.converged, res.method, torch.allclose(res.x, torch.ones(2, dtype=torch.float64))
        (True, 'newton-cg, then newton-exact', True)
        >>> res = minimize(lambda x: x - 3.0, torch.zeros(2, dtype=torch.float64), method="lm")
        >>> res.converged, torch.allclose(res.x, torch.full((2,), 3.0, dtype=torch.float64))
        (True, True)
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if tol is not None:
        gtol = renamed_keyword("minimize", {"tol": tol}, "tol", "gtol", gtol)
    gtol = 1e-6 if gtol is None else gtol
    check_nonneg("gtol", gtol)
    if not isinstance(x0, Tensor):
        x0 = torch.as_tensor(x0, dtype=torch.get_default_dtype())
    if not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor, got {x0.dtype}")
    maxiter = default_maxiter(x0.numel()) if maxiter is None else maxiter
    check_int("maxiter", maxiter, minimum=0)
    options = dict(options or {})
    t0 = time.perf_counter()
    hybrid = method == "auto" and x0.numel() <= AUTO_DENSE_MAX and not options
    if method == "auto":
        method = "newton-exact" if x0.numel() <= AUTO_DENSE_MAX else "newton-cg"
    if method == "dense":
        method = "newton-exact"
    if method == "lm":
        method = "gauss-newton"
    if max_time is not None and (
        isinstance(max_time, bool)
        or not isinstance(max_time, (int, float))
        or math.isnan(max_time)
        or max_time < 0
    ):
        raise ValueError(f"max_time must be a number of seconds >= 0 (or None), got {max_time!r}")
    _check_options(options)
    # maxiter=0 runs the method's own loop: it evaluates fun at x0 as its iteration 0 does
    # (the same objective, checks and status) and stops there
    deadline = math.inf if max_time is None else t0 + max_time
    crit_opts = {k: options.pop(k) for k in list(options) if k in _CRITERIA_OPTIONS}
    if "xtol" not in crit_opts:  # x0 is floating point (checked above)
        # the default step tolerance is a float64 one: below x0's resolution (float32's
        # 1.2e-7) a run whose rounding keeps the gradient above gtol never moved x by less
        # than it, and spun to maxiter instead of stopping as stalled
        crit_opts["xtol"] = max(Criteria.xtol, 2 * torch.finfo(x0.dtype).eps)
    criteria = Criteria(gtol=gtol, maxiter=maxiter, deadline=deadline, **crit_opts)
    if method in _CORE_OPTIONS:
        unknown = sorted(set(options) - _CORE_OPTIONS[method])
        if unknown:
            raise ValueError(f"unknown options for {method!r}: {unknown}")
        # a Newton method's fun returns the scalar objective (its loops refuse anything else)
        objective = cast(Callable[[Tensor], Tensor], fun)
        if hybrid:
            return _newton_cg_then_dense(objective, x0, criteria, t0)
        if method == "newton-exact":
            if "hessian_every" in options:
                check_int("hessian_every", options["hessian_every"])
            return newton_dense(objective, x0, criteria, **options)
        return newton_cg(objective, x0, criteria, **options)
    unknown = sorted(set(options) - _GN_OPTIONS)
    if unknown:
        raise ValueError(f"unknown options for 'gauss-newton': {unknown}")
    return gauss_newton(fun, x0, criteria, **options)


def _newton_cg_then_dense(
    fun: Callable[[Tensor], Tensor], x0: Tensor, criteria: Criteria, t0: float
) -> OptimizeResult:
    """``"auto"`` on a small problem: Newton-CG while it is cheap, then dense Newton.

    Dense Newton goes on from Newton-CG's point when that is nearly a solution (``f`` lower,
    ``||grad||`` below :data:`AUTO_RESTART_GRAD` of its start, ``||x||`` within
    :data:`AUTO_RESTART_GROWTH` of ``max(1, ||x0||)``), else it starts again from ``x0``: on the
    teacher-student network Newton-CG heads for a region of saturated units, and on a problem
    whose infimum is not attained the unbounded test should see the whole run.
    """
    budget = max(AUTO_SWITCH_MIN, math.ceil(AUTO_SWITCH_MATVECS * x0.numel()))
    first = newton_cg(fun, x0, criteria, max_matvecs=budget)
    if first.status != "matvecs":
        return first
    h0 = first.history[0] if first.history else {"loss": math.inf, "grad_norm": math.inf}
    near = float(first.x.norm()) <= AUTO_RESTART_GROWTH * max(1.0, float(x0.norm()))
    close = first.grad_norm <= AUTO_RESTART_GRAD * h0["grad_norm"]
    go_on = first.fun < h0["loss"] and near and close
    start = first.x if go_on else x0
    rest = dataclasses.replace(criteria, maxiter=max(0, criteria.maxiter - first.nit))
    then = newton_dense(fun, start, rest)
    offset = {k: getattr(first, k) for k in ("nfev", "ngev", "matvecs")}
    history = [{**h, "method": "newton-cg"} for h in first.history] + [
        {
            **h,
            "n_iter": h["n_iter"] + first.nit,
            **{k: h[k] + offset[k] for k in offset},
            "method": "newton-exact",
        }
        for h in then.history
    ]
    # dense Newton stopped short of a solution above a point Newton-CG had already reached:
    # return that point (the run's best), not the dense part's last
    best = first if not then.converged and _lower(first.fun, then.fun) else then
    message = then.message
    if then.status == "maxiter":  # the user's limit, not the dense part's share of it
        message = (
            f"stopped: iteration limit ({criteria.maxiter}) reached before the tolerance; "
            f"||grad|| = {best.grad_norm:.3e} > gtol = {criteria.gtol:.1e}"
        )
    where = "from Newton-CG's point" if go_on else "from x0"
    message = f"{message} (dense Newton {where} after {first.nit} Newton-CG iterations)"
    if best is first:
        message += (
            f"; the result is Newton-CG's last point (f = {first.fun:.6e}), lower than dense "
            f"Newton's (f = {then.fun:.6e})"
        )
    return dataclasses.replace(
        then,
        x=best.x,
        fun=best.fun,
        grad_norm=best.grad_norm,
        nit=first.nit + then.nit,
        nfev=first.nfev + then.nfev,
        ngev=first.ngev + then.ngev,
        matvecs=first.matvecs + then.matvecs,
        method="newton-cg, then newton-exact",
        message=message,
        history=history,
        time=time.perf_counter() - t0,
    )


def _lower(a: float, b: float) -> bool:
    """Whether ``a`` is a lower objective value than ``b`` (NaN is the worst)."""
    if math.isnan(a):
        return False
    return math.isnan(b) or a < b
