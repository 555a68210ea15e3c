r"""Hessian-free optimization (Martens 2010) for mini-batch training."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..func.products import GGNGraph, check_scalar_loss, hvp_from_gradient
from ..func.vectors import parameters_to_vector
from ..newton.model_cg import model_cg
from ..newton.steps import more_damping_update
from ._base import NewtonTypeOptimizer
from ._options import check_int, check_positive, check_unit
from .gauss_newton import OutputCapture, evaluate_output

__all__ = ["HessianFree"]


def _save_points(maxiter: int, ratio: float = 1.3) -> set[int]:
    pts, k = set(), 1.0
    while k <= maxiter:
        pts.add(math.ceil(k))
        k *= ratio
    return pts


class HessianFree(NewtonTypeOptimizer):
    r"""Hessian-free optimization: damped Gauss-Newton (or Hessian) steps by truncated CG.

    Each :meth:`step` takes one mini-batch and:

    1. computes the loss and gradient :math:`g` on the *gradient batch* (the closure);
    2. builds the curvature :math:`C` (GGN :math:`J^\top (\nabla^2_f L) J`, or the Hessian)
       on a smaller *curvature batch* (``curvature_closure``, default the same batch);
    3. runs CG on :math:`(C + \lambda I) d = -g` warm-started from ``cg_decay`` times the
       previous solution, stopping by Martens' relative-progress rule (``progress_tol``)
       or ``cg_maxiter``, and keeps the iterates at iterations :math:`\lceil 1.3^j \rceil`;
    4. *CG-iterate backtracking*: walks back from the last kept iterate while the loss on
       the gradient batch keeps falling, and takes the best;
    5. adapts the damping by the reduction ratio :math:`\rho = (L(\theta + d) - L(\theta)) /
       (g^\top d + \tfrac12 d^\top C d)`: :math:`\lambda \leftarrow \tfrac32\lambda` when
       :math:`\rho < 1/4`, :math:`\lambda \leftarrow \tfrac23\lambda` when :math:`\rho > 3/4`;
    6. takes the step with an Armijo backtracking line search (rate ``0.8`` per trial).

    The closures are torch.optim's (zero the gradients, compute the loss, call
    ``backward()``, return the loss). For the GGN, build the optimizer from the model,
    ``HessianFree(model, ...)``: a forward hook reads the network output, with its graph.
    They must evaluate the same batch on every call within one :meth:`step`::

        opt = HessianFree(model)

        def closure():                   # gradient batch
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            return loss

        def curvature_closure():         # a smaller slice of it
            opt.zero_grad()
            loss = loss_fn(model(xb[:64]), yb[:64])
            loss.backward()
            return loss

        opt.step(closure, curvature_closure)

    The optimizer runs the ``backward()`` itself (with the graph the curvature products need;
    none at all at the loss-only evaluations of the backtracking). Closures returning
    ``(loss, output)``, or the loss without ``backward()`` (the old forms), still work until
    0.3, with a ``DeprecationWarning``.

    Args:
        params: the model (an ``nn.Module``; its output captured for the GGN) or its
            parameters (one group; with ``curvature="ggn"`` the deprecated pair closure).
        damping: initial :math:`\lambda` (default 1.0).
        curvature: ``"ggn"`` (default, positive semi-definite) or ``"hessian"``.
        cg_maxiter: CG iterations per step (default 50).
        cg_decay: warm-start factor for the previous solution (default 0.95; 0 disables).
        progress_tol: Martens' :math:`\epsilon` (default 5e-4).
        min_damping, max_damping: bounds on :math:`\lambda` (defaults 1e-8, 1e8).
        boost, drop: damping factors (defaults 1.5 and 2/3).
        armijo: sufficient-decrease constant of the line search (default 1e-2).
        max_line_search: line-search trials before the step is skipped (default 20).
        gtol: stop when :math:`\|g\| \le` this (default 1e-7).
        **deprecated: ``tolerance_grad``, ``cg_max_iter`` (removed in 0.3).

    Raises:
        ValueError: invalid hyperparameters.
        TypeError: an unknown keyword; at :meth:`step`, a closure that returns no scalar loss,
            or (GGN) no way to get the network output.

    State: counters ``n_iter, nfev, ngev, matvecs`` (``nhvp``: deprecated), ``n_rejected``, ``loss``, ``grad_norm``,
    ``damping``, ``direction`` (the last CG solution, for warm starts), ``cg_iterations``,
    ``history``. A rejected step (no CG iterate with a finite loss, or a failed line search)
    leaves the parameters where they were; the first case also raises the damping by
    ``boost``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X, y = torch.randn(64, 4), torch.randn(64, 1)
        >>> opt = HessianFree(model)
        >>> def closure(rows=slice(None)):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(X[rows]), y[rows])
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure, lambda: closure(slice(16)))  # curvature on 16 examples
        >>> opt.step(closure) < first
        tensor(True)

    References:
        Martens (2010), *Deep learning via Hessian-free optimization*, ICML;
        Martens & Sutskever (2012), *Training deep and recurrent networks with Hessian-free
        optimization*.
    """

    _renamed_defaults = dict(gtol=1e-7, cg_maxiter=50)

    def __init__(
        self,
        params,
        damping: float = 1.0,
        curvature: str = "ggn",
        cg_maxiter: int = 50,
        cg_decay: float = 0.95,
        progress_tol: float = 5e-4,
        min_damping: float = 1e-8,
        max_damping: float = 1e8,
        boost: float = 1.5,
        drop: float = 2.0 / 3.0,
        armijo: float = 1e-2,
        max_line_search: int = 20,
        gtol: float = 1e-7,
        **deprecated,
    ):
        defaults = self._options(locals())
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        if not (isinstance(cg_decay, (int, float)) and 0 <= cg_decay <= 1):
            raise ValueError(f"cg_decay must lie in [0, 1], got {cg_decay!r}")
        check_positive("progress_tol", progress_tol)
        if not (isinstance(boost, (int, float)) and boost > 1):
            raise ValueError(f"boost must be > 1, got {boost!r}")
        check_unit("drop", drop)
        check_unit("armijo", armijo)
        check_int("max_line_search", max_line_search, minimum=0)
        self._capture, params = OutputCapture.of(params)
        super().__init__(params, defaults)

    def _loss_only(self, closure) -> float:
        return self._value(closure, pair="accept")

    def _curvature_product(self, pair_or_loss, curvature: str):
        params = self._params
        st = self._state
        if curvature == "ggn":
            loss, out = pair_or_loss
            graph = GGNGraph(loss, out, params)

            def prod(v: Tensor) -> Tensor:
                st["matvecs"] += 1
                with torch.enable_grad():
                    res = graph.gvp(self._split(v))
                return parameters_to_vector(res)
        else:
            loss = pair_or_loss[0] if isinstance(pair_or_loss, (tuple, list)) else pair_or_loss
            grads, _ = self._gradient(loss, create_graph=True)

            def prod(v: Tensor) -> Tensor:
                st["matvecs"] += 1
                with torch.enable_grad():
                    res = hvp_from_gradient(grads, params, self._split(v))
                return parameters_to_vector(res)

        return prod

    @torch.no_grad()
    def step(  # type: ignore[override]  # closure required, loss returned as a tensor
        self, closure: Callable, curvature_closure: Callable | None = None
    ) -> Tensor:
        """One Hessian-free update on the current batch.

        Args:
            closure: torch.optim's closure on the gradient batch.
            curvature_closure: the same for the curvature batch (default: ``closure``'s batch).

        Returns:
            The loss on the gradient batch before the update: the closure's tensor,
            detached (its dtype and device).
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure")
        group = self.param_groups[0]
        st = self._state
        st.setdefault("damping", float(group["damping"]))
        raw_closure = closure
        curv = group["curvature"]
        call, output = evaluate_output(self, self._capture, closure, need_output=curv == "ggn")
        check_scalar_loss(call.loss)
        loss = call.loss
        with torch.enable_grad():
            _, g = self._gradient(loss, create_graph=False, retain_graph=True)
        if call.backward:
            self._write_grad(g)
        f0 = float(loss.detach())
        gnorm = float(torch.linalg.vector_norm(g))
        st["loss"], st["grad_norm"] = f0, gnorm
        st["stop_reason"] = None
        if gnorm <= group["gtol"]:
            st["stop_reason"] = f"converged: ||grad|| = {gnorm:.3e} <= gtol"
            self._record(damping=st["damping"])
            return loss.detach()
        if curvature_closure is None:
            cpair = (loss, output)
        else:
            ccall, cout = evaluate_output(
                self, self._capture, curvature_closure, need_output=curv == "ggn"
            )
            cpair = (ccall.loss, cout)
        with torch.enable_grad():
            prod = self._curvature_product(cpair, curv)
        lam = st["damping"]
        prev = st.get("direction")
        x0 = None
        if prev is not None and group["cg_decay"] > 0 and prev.shape == g.shape:
            x0 = group["cg_decay"] * prev.to(g)
        maxiter = group["cg_maxiter"]
        res = model_cg(
            lambda v: prod(v) + lam * v,
            g,
            x0=x0,
            maxiter=maxiter,
            tol=1e-10,
            progress_tol=group["progress_tol"],
            save_at=_save_points(maxiter),
            reorthogonalize=False,  # mini-batch curvature: plain CG, as Martens'
        )
        del cpair
        # a non-finite solution (overflowing curvature) must not seed the next warm start
        finite = bool(torch.isfinite(res.x).all())
        st["direction"] = res.x.detach().clone() if finite else None
        st["cg_iterations"] = res.iterations
        # CG-iterate backtracking on the gradient batch: from the last iterate back while the
        # loss falls (past iterates whose loss is not finite)
        x = self._gather_flat()
        best_f, best = math.inf, None
        try:
            for _i, d, Ad in reversed(res.saved):
                self._set_flat(x + d)
                f = self._loss_only(raw_closure)
                if f < best_f:
                    best_f, best = f, (d, Ad)
                elif best is not None:
                    break
        except BaseException:
            self._set_flat(x)  # never leave the parameters at a trial point
            raise
        if best is None:
            # every CG iterate overflows or gives NaN: reject the step and raise the damping
            self._set_flat(x)
            st["damping"] = min(
                max(lam * group["boost"], group["min_damping"]), group["max_damping"]
            )
            st["n_rejected"] += 1
            st["n_iter"] += 1
            st["rate"] = 0.0
            self._record(damping=st["damping"], rho=-math.inf, rate=0.0, cg=res.iterations)
            return loss.detach()
        d, Ad = best
        # damping by the reduction ratio of the undamped curvature model
        q = float(torch.dot(g, d)) + 0.5 * (float(torch.dot(d, Ad)) - lam * float(torch.dot(d, d)))
        rho = (best_f - f0) / q if q < 0 else -math.inf
        lam = more_damping_update(lam, rho, shrink=group["drop"], grow=group["boost"])
        st["damping"] = min(max(lam, group["min_damping"]), group["max_damping"])
        # Armijo line search along the chosen iterate
        slope = float(torch.dot(g, d))
        rate, f_rate = 1.0, best_f
        accepted = False
        try:
            for _ in range(group["max_line_search"] + 1):
                if slope < 0 and f_rate <= f0 + group["armijo"] * rate * slope:
                    accepted = True
                    break
                rate *= 0.8
                self._set_flat(x + rate * d)
                f_rate = self._loss_only(raw_closure)
        except BaseException:
            self._set_flat(x)
            raise
        if accepted:
            self._set_flat(x + rate * d)
        else:
            self._set_flat(x)
            st["n_rejected"] += 1
        st["n_iter"] += 1
        st["rate"] = rate if accepted else 0.0
        self._record(damping=st["damping"], rho=rho, rate=st["rate"], cg=res.iterations)
        return loss.detach()
