r"""What every loop of the Newton core shares: the counted objective and the bookkeeping.

:class:`Objective` evaluates ``fun`` of one flat vector and counts values, gradients and
products; :class:`RayTest` confirms unbounded iterates; :func:`record_and_check` appends an
iteration's record and asks the :class:`~second.newton.stopping.Criteria`;
:func:`finish` turns the stopping reason into an :class:`~second.newton.result.OptimizeResult`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..func.products import hvp_from_gradient
from .result import OptimizeResult
from .stopping import Criteria, limit_message, ray_decreases

#: ``torch.autograd.grad``'s call into the autograd engine, and the engine itself (private to
#: torch: ``None`` where this torch lacks them, and products then go through
#: ``torch.autograd.grad``). The engine runs a CPU graph on the calling thread; the wrapper
#: adds what its device threads need (and torch's debug logging).
_RUN_BACKWARD = getattr(torch.autograd.graph, "_engine_run_backward", None)
_ENGINE = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)


def _backward_runner(a: Tensor, b: Tensor):
    """``run(outputs, grad_outputs, keep_graph, create_graph, inputs, allow_unused, accumulate)``.

    The engine call ``torch.autograd.grad`` makes, for two plain tensors ``a`` (the output) and
    ``b`` (the input); ``None`` for a subclass, whose ``__torch_function__``
    ``torch.autograd.grad`` must see, or without the engine.
    """
    if type(a) is not Tensor or type(b) is not Tensor:
        return None
    if _ENGINE is not None and a.is_cpu and b.is_cpu:
        return _ENGINE.run_backward
    return _RUN_BACKWARD


__all__ = [
    "Objective",
    "RayTest",
    "MESSAGES",
    "NO_GRAPH",
    "record_and_check",
    "finish",
    "gradient_or_raise",
]

#: The error for an objective with no autograd path to ``x``: its gradient is not zero, it is
#: unknown (a detached value would otherwise be reported converged at ``x0``).
NO_GRAPH = (
    "the objective does not depend on x through autograd: fun(x) returned a value without an "
    "autograd graph back to x (computed from x.detach(), through float() / .item() / numpy, "
    "or under torch.no_grad()); compute it from x with torch operations"
)

MESSAGES = {
    "converged": "converged: ||grad|| = {g:.3e} <= gtol = {gtol:.1e}",
    "nonfinite": "the objective or its gradient is not finite (f = {f}, ||grad|| = {g})",
    "unbounded": (
        "objective unbounded / diverging iterates: ||x|| grew from {x0:.3e} to {x:.3e} over "
        "the last accepted steps while f fell to {f:.6e}; the infimum is not attained at a "
        "finite point (or f is unbounded below)"
    ),
    "unbounded_below": (
        "objective unbounded below: f fell ever faster from {f0:.6e} to {f:.6e} while ||x|| "
        "grew geometrically from {x0:.3e} to {x:.3e}, and it keeps falling along the "
        "iterates' drift as far as it was tested"
    ),
    "time": "stopped: time limit",
}


class Objective:
    """``fun`` of one flat vector, with counters: values, gradients (with graph) and products.

    Args:
        fun: ``x -> scalar tensor`` on a tensor shaped like ``shape``.
        shape: the shape ``fun`` expects.
        name: the method name, for error messages.

    Example:
        >>> obj = Objective(lambda x: (x**2).sum(), (2,))
        >>> f, g, _ = obj.value_grad(torch.ones(2, dtype=torch.float64))
        >>> f, g.tolist(), obj.ngev
        (2.0, [2.0, 2.0], 1)
    """

    def __init__(self, fun: Callable[[Tensor], Tensor], shape: torch.Size, name: str = "newton"):
        self.fun, self.shape, self.name = fun, tuple(shape), name
        self.nfev = self.ngev = self.matvecs = 0
        #: ``(gradient with its graph, point)`` of the last ``finish(graph=True)``: what
        #: :func:`~second.newton.dense_hessian` differentiates.
        self.graph: tuple[Tensor, Tensor] | None = None

    def _call(self, x: Tensor) -> Tensor:
        f = self.fun(x if x.shape == self.shape else x.reshape(self.shape))
        if not isinstance(f, Tensor) or f.numel() != 1:
            raise ValueError(f"method {self.name!r} needs fun(x) to return a scalar tensor")
        self.nfev += 1
        return f if f.dim() == 0 else f.reshape(())

    def value(self, x: Tensor) -> float:
        """``f(x)`` without a graph."""
        with torch.no_grad():
            return float(self._call(x))

    def value_grad(self, x: Tensor, graph: bool = False):
        """``(f, flat gradient, hvp)``; ``hvp`` is ``None`` unless ``graph``."""
        f, finish = self.trial(x)
        g, hvp = finish(graph)
        return f, g, hvp

    def trial(self, x: Tensor):
        """``(f, finish)``: the value now, ``finish(graph) -> (gradient, hvp)`` on acceptance.

        The forward graph is kept, so an accepted trial point costs no second forward pass
        and a rejected one no backward pass.
        """
        return self._trial(x.detach().clone().requires_grad_(True))

    def _trial(self, xr: Tensor):
        """:meth:`trial` at the fresh leaf ``xr`` (``requires_grad`` set, no history)."""
        if torch.is_grad_enabled():
            f = self._call(xr)
        else:
            with torch.enable_grad():
                f = self._call(xr)
        if not f.requires_grad:
            raise ValueError(NO_GRAPH)
        run = _backward_runner(f, xr)

        def finish(graph: bool = True):
            if run is not None:
                # torch.autograd.grad(f, xr, create_graph=graph, allow_unused=True) without
                # its argument handling: the engine call with the seed it would make
                seed = (torch.ones_like(f, memory_format=torch.preserve_format),)
                (g,) = run((f,), seed, graph, graph, (xr,), True, False)
                if g is None:
                    raise ValueError(NO_GRAPH)
            else:
                with torch.enable_grad():
                    g = gradient_or_raise(f, xr, create_graph=graph)
            hvp = self._hvp(g, xr) if graph else None
            if graph:
                self.graph = (g, xr)
            self.ngev += 1
            return g.detach(), hvp

        return f.item(), finish

    def trial_at(self, x: Tensor):
        """``p -> self.trial(x + p)``: the trial of a step from ``x``."""
        x = x.detach()

        def at(p: Tensor):
            xp = x + p
            if xp.requires_grad:  # a step with a graph: trial() detaches a copy
                return self.trial(xp)
            return self._trial(xp.requires_grad_(True))

        return at

    def _hvp(self, g: Tensor, xr: Tensor):
        if not g.requires_grad:
            return lambda v: torch.zeros_like(v)
        run = _backward_runner(g, xr)
        outputs, inputs, shape = (g,), (xr,), g.shape

        def prod(v: Tensor) -> Tensor:
            self.matvecs += 1
            if run is not None and v.shape == shape and type(v) is Tensor:
                # the engine call of torch.autograd.grad(g, xr, v, retain_graph=True,
                # allow_unused=True) without its argument handling and shape checks, which
                # cost a tenth of a product on a small network (here the shapes are known)
                (hv,) = run(outputs, (v,), True, False, inputs, True, False)
                return torch.zeros_like(v) if hv is None else hv
            with torch.enable_grad():
                (hv,) = hvp_from_gradient([g], [xr], [v])
            return hv.detach()

        return prod


def gradient_or_raise(f: Tensor, xr: Tensor, **options) -> Tensor:
    r""":math:`\nabla f` at the leaf ``xr``, or :data:`NO_GRAPH` as a ``ValueError``.

    A graph that reaches ``xr`` gives the gradient, with zeros for the coordinates ``f`` does
    not depend on; a value with no graph, or one whose graph never reaches ``xr`` (it
    depends on other tensors only), raises (``options`` go to ``torch.autograd.grad``).

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> gradient_or_raise((x[0] ** 2).reshape(()), x).tolist()  # no path to x[1]: zero there
        [2.0, 0.0]
    """
    if not f.requires_grad:
        raise ValueError(NO_GRAPH)
    (g,) = torch.autograd.grad(f, xr, allow_unused=True, **options)
    if g is None:
        raise ValueError(NO_GRAPH)
    return g


class RayTest:
    """The ray confirmation of the unbounded test for a loop (:func:`ray_decreases`).

    Call :meth:`accept` with each accepted iterate; the instance is the ``ray`` of
    :meth:`Criteria.check` (run at most once per ``window`` accepted steps).

    Args:
        value: ``x -> f(x)`` without a graph.
        criteria: the run's stopping rules (``unbounded_window``, ``unbounded_reach``).
        x0: the starting point (flat).
        f0: :math:`f(x_0)`.
    """

    def __init__(self, value: Callable[[Tensor], float], criteria: Criteria, x0: Tensor, f0: float):
        self.value, self.criteria = value, criteria
        self.xs: list[Tensor] = [x0]
        self.f = f0
        self.wait = 0

    def accept(self, x: Tensor, f: float) -> None:
        """Record an accepted iterate and its value."""
        self.xs = (self.xs + [x])[-(self.criteria.unbounded_window + 1) :]
        self.f = f
        self.wait = max(0, self.wait - 1)

    def __call__(self) -> bool:
        """Run :func:`ray_decreases` along the drift of the last ``window`` iterates."""
        if self.wait > 0 or len(self.xs) < 2:
            return False
        self.wait = self.criteria.unbounded_window
        d = self.xs[-1] - self.xs[0]
        return ray_decreases(
            self.value, self.xs[-1], d, self.f, reach=self.criteria.unbounded_reach
        )


def _counts(obj) -> dict[str, int]:
    """The objective's counters, as history records and results name them."""
    return dict(nfev=obj.nfev, ngev=obj.ngev, matvecs=obj.matvecs)


def record_and_check(
    obj, criteria, history, it, f, gnorm, radius, xnorms, fvals, ray=None, near=None
):
    """Append the iteration's record to ``history`` and return the stopping reason (or None)."""
    history.append(
        dict(
            n_iter=it,
            **_counts(obj),
            loss=f,
            grad_norm=gnorm,
            radius=radius,
            x_norm=xnorms[-1],
            cpu=time.process_time(),
        )
    )
    now = time.perf_counter()
    return criteria.check(
        it=it,
        f=f,
        gnorm=gnorm,
        now=now,
        xnorms=xnorms,
        fvals=fvals,
        gnorm0=history[0]["grad_norm"],
        ray=ray,
        near=near,
    )


def finish(obj, x, f, gnorm, it, reason, crit, method, history, t0, xnorms, x0shape, extra=""):
    """The run's :class:`~second.newton.result.OptimizeResult`, its message from ``reason``."""
    gtol = crit.gtol
    if reason == "maxiter":
        message = limit_message(crit.maxiter, [h["grad_norm"] for h in history], gtol)
    elif reason == "unbounded":
        fvals = [h["loss"] for h in history]
        key = "unbounded_below" if crit.falls_without_bound(fvals) else "unbounded"
        message = MESSAGES[key].format(x0=xnorms[0], x=xnorms[-1], f=f, f0=fvals[0])
    elif reason == "nonfinite" and extra:  # the loop's own account (e.g. a product overflowed)
        message = extra
    elif reason in MESSAGES:
        message = MESSAGES[reason].format(g=gnorm, gtol=gtol, f=f)
    else:
        message = extra
    converged = reason == "converged" and math.isfinite(f) and math.isfinite(gnorm)
    return OptimizeResult(
        x=x.detach().reshape(x0shape),
        fun=f,
        grad_norm=gnorm,
        nit=it,
        **_counts(obj),
        converged=converged,
        message=message,
        method=method,
        status=reason,
        history=history,
        time=time.perf_counter() - t0,
    )
