r"""Gauss-Newton / Levenberg-Marquardt on the generalized Gauss-Newton matrix."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, overload

import torch
from torch import Tensor

from ..func import (
    columns_to_parameters,
    dense_from_matmat,
    parameters_to_columns,
    parameters_to_vector,
)
from ..func.products import GGNGraph, check_scalar_loss
from ..newton.globalize import lm_damping_update
from ..newton.steps import DAMPING_RULES, damped_solve, damped_step
from ._base import NewtonTypeOptimizer
from ._closure import CLOSURE_EXAMPLE, ClosureCall

__all__ = [
    "GaussNewton",
    "unpack_closure_output",
    "lm_damping_update",
    "OutputCapture",
    "evaluate_output",
    "network_output",
]


class OutputCapture:
    """The outputs of a module's forward calls, recorded while :meth:`active` (a forward hook).

    How Gauss-Newton-type optimizers built from a model get the network output from a plain
    torch.optim closure: the hook keeps the output of each forward call made inside the
    closure, with its graph, so no second forward pass is needed.

    Args:
        module: the model whose output is the GGN's "output".

    Example:
        >>> m = torch.nn.Linear(2, 1)
        >>> cap = OutputCapture(m)
        >>> with cap.active() as outs:
        ...     _ = m(torch.ones(3, 2))
        >>> len(outs), outs[0].shape
        (1, torch.Size([3, 1]))
    """

    def __init__(self, module: torch.nn.Module):
        self._outputs: list | None = None
        self.handle = module.register_forward_hook(self._hook)

    @classmethod
    def of(cls, params) -> tuple[OutputCapture | None, list]:
        """``(capture, trainable parameters)`` for a model; ``(None, params)`` for parameters."""
        if isinstance(params, torch.nn.Module):
            return cls(params), [p for p in params.parameters() if p.requires_grad]
        return None, params

    def _hook(self, module, args, output) -> None:
        if self._outputs is not None:
            self._outputs.append(output)

    @contextlib.contextmanager
    def active(self):
        """Record the outputs of the forward calls made inside the ``with`` block."""
        outs: list = []
        self._outputs = outs
        try:
            yield outs
        finally:
            self._outputs = None


def network_output(owner: str, call: ClosureCall, outputs: list | None) -> Tensor:
    """The network output of one closure call: the captured one, or the deprecated pair's.

    Raises:
        TypeError: no output (an optimizer built from parameters with a closure that returns
            the loss), or a model that ran more than once in the closure.
    """
    if call.output is not None:
        out = call.output
    elif outputs is None:
        raise TypeError(
            f"{owner} needs the network output for the Gauss-Newton matrix: build it from the "
            f"model, {owner}(model, ...), and write torch.optim's closure: {CLOSURE_EXAMPLE} "
            "(a closure returning (loss, output) is the deprecated form)"
        )
    elif len(outputs) != 1:
        raise TypeError(
            f"{owner}: the model ran {len(outputs)} times in one closure call; the "
            "Gauss-Newton matrix needs the one output the loss was computed from"
        )
    else:
        out = outputs[0]
    if not isinstance(out, Tensor) or not out.requires_grad:
        raise ValueError("the network output must be a tensor with its graph")
    return out


def unpack_closure_output(out, finite: bool = True) -> tuple[Tensor, Tensor]:
    """Check and split what a Gauss-Newton closure returns: ``(loss, output)``.

    With ``finite`` (default) a NaN or Inf loss raises :class:`~second.NonFiniteError`;
    a trial point passes ``finite=False`` and rejects the step instead.
    """
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            "a Gauss-Newton closure must return (loss, output): the scalar loss and the network "
            f"output it was computed from; got {type(out).__name__}"
        )
    loss, output = out
    check_scalar_loss(loss, finite=finite)
    if not isinstance(output, Tensor) or not output.requires_grad:
        raise ValueError("the closure's output must be the network output, with its graph")
    return loss, output


@overload
def evaluate_output(
    opt: NewtonTypeOptimizer,
    capture: OutputCapture | None,
    closure,
    need_output: Literal[True] = True,
) -> tuple[ClosureCall, Tensor]: ...


@overload
def evaluate_output(
    opt: NewtonTypeOptimizer, capture: OutputCapture | None, closure, need_output: bool
) -> tuple[ClosureCall, Tensor | None]: ...


def evaluate_output(
    opt: NewtonTypeOptimizer, capture: OutputCapture | None, closure, need_output: bool = True
) -> tuple[ClosureCall, Tensor | None]:
    """One closure call of ``opt`` with the network output (captured, or the deprecated pair's).

    Returns:
        ``(call, output)``; ``output`` is ``None`` unless ``need_output``.

    Raises:
        TypeError: as :func:`network_output` (only when ``need_output``).
    """
    name = type(opt).__name__
    if capture is None:
        call = opt._call(closure, pair="deprecated")
        return call, (network_output(name, call, None) if need_output else None)
    with capture.active() as outs:
        call = opt._call(closure, pair="deprecated")
    return call, (network_output(name, call, outs) if need_output else None)


class GaussNewton(NewtonTypeOptimizer):
    r"""Levenberg-Marquardt: damped generalized Gauss-Newton steps with adaptive damping.

    Each iteration solves

    .. math:: (G + \lambda I)\, d = -g, \qquad G = J^\top (\nabla^2_f L) J,

    with :math:`J` the Jacobian of the network output :math:`f`, by CG (``solver="cg"``,
    matrix-free, each product two backward passes) or by forming :math:`G` and solving
    densely (``solver="dense"``: :math:`P` products once per point, after which a rejected
    step is re-solved for free). The step is accepted when the ratio of actual to
    predicted reduction :math:`\rho = (L(\theta) - L(\theta + d)) / -(g^\top d + \tfrac12
    d^\top G d)` exceeds ``eta``, and :math:`\lambda` follows Nielsen's rule
    (:func:`lm_damping_update`, ``damping_rule="nielsen"``) or Moré's trust-region rule
    (:func:`second.newton.more_damping_update`, ``"more"``); one iteration is
    :func:`second.newton.damped_step`. :math:`G` is positive semi-definite for losses convex
    in the output (MSE, cross-entropy), so the method is the natural one for least squares
    and cross-entropy.

    Built from the model, ``GaussNewton(model, ...)``, it takes torch.optim's closure (zero
    the gradients, compute the loss, call ``backward()``, return the loss) and reads the
    network output from a forward hook on the model, with its graph: no second forward pass.
    The closure must run the model once::

        opt = GaussNewton(model, damping=1e-3)

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

    The optimizer runs that ``backward()`` itself (keeping the graph the Gauss-Newton
    products need; none at all at a rejected trial point); after :meth:`step`, ``.grad``
    holds the gradient at the current point. Built from parameters with a closure returning
    ``(loss, output)`` (the old form) it still works until 0.3, with a ``DeprecationWarning``.

    Full-batch use: pass the same closure object on every call, and the evaluation at the
    accepted trial point is reused by the next call. Mini-batch use: a new closure object
    (a new batch) triggers a fresh evaluation at the start of the call.

    Args:
        params: the model (an ``nn.Module``: its parameters, and its output captured by a
            forward hook) or the parameters (one group; deprecated closure form).
        damping: initial :math:`\lambda` (default 1e-3).
        min_damping: floor for :math:`\lambda` (default 1e-12).
        max_damping: ceiling; reaching it stops the optimizer (default 1e12).
        eta: acceptance threshold on :math:`\rho` (default 1e-4).
        solver: ``"cg"`` (default) or ``"dense"``.
        maxiter: LM iterations per :meth:`step` call (default 1).
        cg_maxiter: CG iterations per solve (default: ``min(P, 250)``).
        cg_tol: fixed relative CG tolerance (default ``None``: ``min(0.5, sqrt(||g||))``).
        gtol: stop when :math:`\|g\| \le` this (default 1e-7).
        tolerance_change: stop when an accepted step is smaller (default 1e-12).
        damping_rule: ``"nielsen"`` (default) or ``"more"``.
        **deprecated: ``tolerance_grad``, ``max_iter``, ``cg_max_iter``, ``cg_rtol`` (the
            deprecated spellings of ``gtol``, ``maxiter``, ``cg_maxiter``, ``cg_tol``; removed
            in 0.3).

    Raises:
        ValueError: invalid hyperparameters.
        TypeError: an unknown keyword; at :meth:`step`, a closure that returns no scalar loss,
            or no way to get the network output.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X = torch.randn(20, 3, dtype=torch.float64); y = X.sum(1, keepdim=True)
        >>> opt = GaussNewton(model, maxiter=20, damping=1e-8)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(X), y)
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> opt.converged
        True

    References:
        Levenberg (1944); Marquardt (1963); Moré (1978), *The Levenberg-Marquardt algorithm:
        implementation and theory*; Nielsen (1999), *Damping parameter in Marquardt's
        method*; Schraudolph (2002) for the generalized Gauss-Newton matrix.
    """

    _renamed_defaults = dict(gtol=1e-7, maxiter=1, cg_maxiter=None, cg_tol=None)

    def __init__(
        self,
        params,
        damping: float = 1e-3,
        min_damping: float = 1e-12,
        max_damping: float = 1e12,
        eta: float = 1e-4,
        solver: str = "cg",
        maxiter: int = 1,
        cg_maxiter: int | None = None,
        cg_tol: float | None = None,
        gtol: float = 1e-7,
        tolerance_change: float = 1e-12,
        damping_rule: str = "nielsen",
        **deprecated,
    ):
        defaults = self._options(locals())
        if not (isinstance(eta, (int, float)) and 0 <= eta < 1):
            raise ValueError(f"eta must lie in [0, 1), got {eta!r}")
        if solver not in ("cg", "dense"):
            raise ValueError(f"solver must be 'cg' or 'dense', got {solver!r}")
        if damping_rule not in DAMPING_RULES:
            raise ValueError(f"damping_rule must be one of {DAMPING_RULES}, got {damping_rule!r}")
        self._capture, params = OutputCapture.of(params)
        super().__init__(params, defaults)

    # -- evaluation ----------------------------------------------------------------------
    def _evaluate(self, closure) -> tuple[ClosureCall, Tensor]:
        """One closure call: the loss and the network output."""
        return evaluate_output(self, self._capture, closure)

    def _point(self, call: ClosureCall, out: Tensor) -> dict:
        """Loss, flat gradient and the pair the GGN is built from, at the current point."""
        check_scalar_loss(call.loss)
        with torch.enable_grad():
            _, g = self._gradient(call.loss, create_graph=False, retain_graph=True)
        if call.backward:
            self._write_grad(g)
        loss = call.loss.detach()
        return dict(loss=float(loss), loss_t=loss, pair=(call.loss, out), g=g)

    # -- curvature -----------------------------------------------------------------------
    def _graph(self, cache, closure) -> GGNGraph:
        if "graph" not in cache:
            pair = cache.pop("pair", None)
            if pair is None:  # the point's graph was consumed by a rejected trial
                call, out = self._evaluate(closure)
                pair = (call.loss, out)
            loss, out = pair
            with torch.enable_grad():
                cache["graph"] = GGNGraph(loss, out, self._params)
        return cache["graph"]

    def _gvp(self, graph: GGNGraph, v: Tensor) -> Tensor:
        self._state["matvecs"] += 1
        with torch.enable_grad():
            out = graph.gvp(self._split(v))
        return parameters_to_vector(out)

    def _dense(self, cache, closure):
        if "eig" not in cache:
            graph = self._graph(cache, closure)
            g = cache["g"]

            def matmat(E: Tensor) -> Tensor:
                with torch.enable_grad():
                    out = graph.gvp(columns_to_parameters(E, self._params), batched=True)
                return parameters_to_columns(out)

            G = dense_from_matmat(
                matmat, None, g.numel(), dtype=g.dtype, device=g.device, chunk_size=256
            )
            self._state["matvecs"] += g.numel()
            G = G.to(torch.float64)
            cache["eig"] = torch.linalg.eigh(0.5 * (G + G.T))
        return cache["eig"]

    def _solve(self, cache, closure, damping: float, gnorm: float) -> tuple[Tensor, float]:
        """The step and the predicted reduction ``-(g.d + d.G d / 2)``."""
        group = self.param_groups[0]
        g = cache["g"]
        if group["solver"] == "dense":
            return damped_solve(g, damping, eig=self._dense(cache, closure))
        graph = self._graph(cache, closure)
        tol = group["cg_tol"]
        if tol is None:
            tol = min(0.5, math.sqrt(gnorm))
        maxiter = group["cg_maxiter"] or min(g.numel(), 250)
        return damped_solve(
            g,
            damping,
            gvp=lambda v: self._gvp(graph, v),
            maxiter=maxiter,
            tol=tol,
            reorthogonalize=False,  # mini-batch curvature: plain CG
        )

    def _trial(self, closure, x: Tensor, holder: dict):
        """``d -> (f(x + d), finish)``: scatter the step and run the closure, graph kept.

        ``finish()`` differentiates the trial loss (once) and leaves the point in ``holder``.
        """

        def trial(d: Tensor):
            # a non-finite trial loss rejects the step
            call, out = self._evaluate_at(x, d, lambda: self._evaluate(closure))

            def finish(graph: bool = True):
                if "point" not in holder:
                    holder["point"] = self._point(call, out)
                return holder["point"]["g"], None

            return float(call.loss.detach()), finish

        return trial

    # -- step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(  # type: ignore[override]  # closure required, loss returned as a tensor
        self, closure: Callable[[], Tensor]
    ) -> Tensor:
        """Perform up to ``maxiter`` Levenberg-Marquardt iterations (:func:`~second.newton.damped_step`).

        The closure, the value returned (the loss at the start of the call) and the errors are
        those of :meth:`NewtonCG.step <second.optim.NewtonCG.step>`; the ``TypeError`` also
        covers a network output that cannot be found.
        """
        cache = self._begin(closure)
        group = self.param_groups[0]
        st = self._state
        st.setdefault("damping", float(group["damping"]))
        st.setdefault("nu", 2.0)
        first_loss = None
        for _ in self._iterations():
            if "g" not in cache:
                cache, gnorm = self._arrive(
                    cache, lambda: self._point(*self._evaluate(closure)), damping=st["damping"]
                )
                first_loss = self._loss_tensor(cache) if first_loss is None else first_loss
                if self._gtol_met(gnorm):
                    break
            first_loss = self._loss_tensor(cache) if first_loss is None else first_loss
            g, x = cache["g"], cache["x"]
            gnorm = float(torch.linalg.vector_norm(g))
            holder: dict[str, Any] = {}
            res = damped_step(
                cache["loss"],
                g,
                st["damping"],
                functools.partial(self._solve, cache, closure, gnorm=gnorm),
                self._trial(closure, x, holder),
                nu=st["nu"],
                rule=group["damping_rule"],
                eta=group["eta"],
                min_damping=group["min_damping"],
                max_damping=group["max_damping"],
            )
            if self._model_failed(res.predicted_reduction, "Gauss-Newton"):
                break
            st["damping"], st["nu"] = res.damping, res.nu
            if res.accepted:  # the parameters are at the trial point
                step_norm = float(torch.linalg.vector_norm(res.step))
                assert res.finish is not None  # an accepted step was tried
                res.finish()
                cache = dict(accepted=holder["point"])
                self._step_stalled(step_norm)
            else:
                self._set_flat(x)
                st["n_rejected"] += 1
                cache.pop("graph", None)  # in-place parameter updates invalidate its graph
                cache.pop("pair", None)
                if res.damping >= group["max_damping"]:
                    st["stop_reason"] = "stalled: damping reached max_damping"
        return self._end(cache, closure, first_loss)
