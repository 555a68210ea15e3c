r"""Trust-region Newton-CG (Steihaug-Toint) on the exact Hessian."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..newton.steps import cg_subproblem, trust_region_step
from ._base import NewtonTypeOptimizer, flat_hvp
from ._closure import ClosureCall
from ._options import check_int, check_positive

__all__ = ["NewtonCG"]


class NewtonCG(NewtonTypeOptimizer):
    r"""Trust-region Newton method with Steihaug-Toint truncated CG on the exact Hessian.

    Each iteration approximately minimizes the second-order model of the loss

    .. math:: m(p) = L(\theta) + g^\top p + \tfrac12 p^\top H p, \qquad \|p\| \le \Delta,

    by truncated CG on Hessian-vector products (a direction of negative curvature is
    followed to the boundary, see :func:`~second.optim.steihaug_cg`), then compares the
    actual reduction with the predicted one, :math:`\rho = (L(\theta) - L(\theta + p)) /
    (L(\theta) - m(p))`. The step is accepted when :math:`\rho > \eta`, and the radius is
    quartered when :math:`\rho < 1/4` and doubled when :math:`\rho > 3/4` on the boundary.
    A rejected step is re-solved by cutting the stored CG path at the smaller radius, so it
    costs one closure evaluation and no Hessian products. The CG tolerance follows the
    forcing sequence :math:`\min(1/2, \sqrt{\|g\|})\,\|g\|` (superlinear local convergence)
    unless ``cg_tol`` is given.

    For deterministic, full-batch problems: the closure must return the same function of
    the parameters every time it is called. Pass the same closure object on every call:
    the evaluation that ends one call (the accepted trial point, or the stored CG path after
    a rejection) is then reused by the next; a different closure object, or parameters
    changed in between, trigger a fresh evaluation.

    The closure is torch.optim's (as for ``torch.optim.LBFGS``): it zeroes the gradients,
    computes the loss, calls ``backward()`` and returns the loss::

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(X), y)
            loss.backward()
            return loss

    The optimizer runs that ``backward()`` itself, with the graph the Hessian-vector products
    need (and not at all at a rejected trial point), so the contract costs no extra forward
    or backward pass; after :meth:`step`, ``.grad`` holds the gradient at the current point.
    It is the returned loss that is differentiated: more ``backward()`` calls in the closure
    (gradient accumulation: return the sum of the micro-batch losses instead), a
    ``backward()`` on another tensor, or ``.grad`` edits (``clip_grad_norm_``) are ignored,
    with one ``UserWarning``. A closure that returns the loss without calling ``backward()``
    (the old form) still works until 0.3, with a ``DeprecationWarning``.

    Args:
        params: parameters to optimize (one group; those that do not require grad are
            skipped; ``add_param_group`` is refused).
        initial_radius: :math:`\Delta_0` (default 1.0).
        max_radius: largest radius (default 1e10).
        eta: acceptance threshold on :math:`\rho`, in :math:`[0, 1/4)` (default 0.1).
        maxiter: trust-region iterations per :meth:`step` call (default 1).
        cg_maxiter: CG iterations per subproblem (default: the number of parameters).
        cg_tol: fixed relative CG tolerance (default ``None``: the forcing sequence).
        gtol: stop when :math:`\|g\|_2 \le` this (default 1e-7).
        tolerance_change: stop when an accepted step or the radius is smaller (default 1e-12).
        preconditioner: optional ``M`` with :math:`M \approx H^{-1}` symmetric positive definite,
            a callable on flat vectors or a :class:`~second.LinearOperator`; the trust region
            becomes :math:`\|p\|_{M^{-1}} \le \Delta`.
        extrapolation: after an accepted interior step whose actual reduction beats the
            model's by 10% (:math:`\rho > 1.1`, typical of valleys that flatten out, e.g.
            saturating units), try up to this many doublings of the step, keeping the best
            (loss evaluations only; default 0: off).
        **deprecated: ``tolerance_grad``, ``max_iter``, ``cg_max_iter``, ``cg_rtol`` (the
            deprecated spellings of ``gtol``, ``maxiter``, ``cg_maxiter``, ``cg_tol``; removed
            in 0.3).

    Raises:
        ValueError: invalid hyperparameters, several parameter groups, or a parameter
            listed twice.
        TypeError: an unknown keyword; at :meth:`step`, a closure that returns no scalar loss.

    State (``optimizer.state[first_param]``, see :class:`NewtonTypeOptimizer`): counters
    ``n_iter, nfev, ngev, matvecs`` (``nhvp``: deprecated), ``loss``, ``grad_norm``, ``radius``, ``stop_reason``,
    ``history``.

    Example:
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = NewtonCG([x], maxiter=100, gtol=1e-10)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> opt.stop_reason.startswith("converged"), torch.allclose(x, torch.ones(2, dtype=x.dtype))
        (True, True)

    References:
        Steihaug (1983); Nocedal & Wright, *Numerical Optimization*, Algorithms 4.1 and 7.2.
    """

    _renamed_defaults = dict(gtol=1e-7, maxiter=1, cg_maxiter=None, cg_tol=None)

    def __init__(
        self,
        params,
        initial_radius: float = 1.0,
        max_radius: float = 1e10,
        eta: float = 0.1,
        maxiter: int = 1,
        cg_maxiter: int | None = None,
        cg_tol: float | None = None,
        gtol: float = 1e-7,
        tolerance_change: float = 1e-12,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
        extrapolation: int = 0,
        **deprecated,
    ):
        defaults = self._options(locals())
        check_positive("initial_radius", initial_radius)
        check_positive("max_radius", max_radius)
        if initial_radius > max_radius:
            raise ValueError(f"initial_radius {initial_radius} exceeds max_radius {max_radius}")
        if not (isinstance(eta, (int, float)) and 0 <= eta < 0.25):
            raise ValueError(f"eta must lie in [0, 0.25), got {eta!r}")
        check_int("extrapolation", extrapolation, minimum=0)
        if preconditioner is not None and not callable(preconditioner):
            raise ValueError("preconditioner must be callable (flat vector -> flat vector)")
        super().__init__(params, defaults)
        self.preconditioner = preconditioner

    def _point(self, call: ClosureCall) -> dict:
        """The current point's record: loss, flat gradient, products, flat parameters."""
        with torch.enable_grad():
            grads, g = self._gradient(call.loss, create_graph=True)
        if call.backward:
            self._write_grad(g)
        loss = call.loss.detach()
        return dict(loss=float(loss), loss_t=loss, g=g, hvp=flat_hvp(self, grads))

    def _trial(self, closure, x: Tensor, holder: dict):
        """``p -> (f(x + p), finish)``: scatter the step, run the closure; graph kept.

        The trial's loss tensor is left in ``holder["loss_t"]``.
        """

        def trial(p: Tensor):
            call = self._evaluate_at(x, p, lambda: self._call(closure))
            holder["loss_t"] = call.loss.detach()
            f = float(holder["loss_t"])

            def finish(graph: bool = True):
                point = self._point(call)
                return point["g"], point["hvp"]

            return f, finish

        return trial

    def _extrapolate(self, closure, x: Tensor, step: Tensor, step_norm: float, f_new: float):
        """Double an interior step while the loss keeps falling (the model under-predicts)."""
        st, group = self._state, self.param_groups[0]
        best_f, best_k = f_new, 0
        for k in range(1, group["extrapolation"] + 1):
            self._set_flat(x + (2.0**k) * step)
            f_k = self._value(closure)
            if not f_k < best_f:
                break
            best_f, best_k = f_k, k
        st["n_extrapolated"] = st.get("n_extrapolated", 0) + (best_k > 0)
        self._set_flat(x + (2.0**best_k) * step)
        st["radius"] = max(st["radius"], (2.0**best_k) * step_norm)

    @torch.no_grad()
    def step(  # type: ignore[override]  # closure required, loss returned as a tensor
        self, closure: Callable[[], Tensor]
    ) -> Tensor:
        """Perform up to ``maxiter`` trust-region iterations (:func:`second.newton.trust_region_step`).

        Args:
            closure: torch.optim's closure (zero the gradients, compute the loss, call
                ``backward()``, return the loss).

        Returns:
            The loss at the start of the call: the closure's tensor, detached (its dtype and
            device, as ``torch.optim.LBFGS`` returns it).

        Raises:
            ValueError: no closure.
            TypeError: the closure returns no scalar loss.
            NonFiniteError: the loss, or else its gradient, is not finite at the current
                point (the parameters are unchanged).
        """
        cache = self._begin(closure)
        group = self.param_groups[0]
        st = self._state
        st.setdefault("radius", float(group["initial_radius"]))
        first_loss = None
        for _ in self._iterations():
            if "g" not in cache:
                cache, gnorm = self._arrive(
                    cache, lambda: self._point(self._call(closure)), radius=st["radius"]
                )
                first_loss = self._loss_tensor(cache) if first_loss is None else first_loss
                # (a non-finite loss or gradient has raised NonFiniteError in _gradient)
                if self._gtol_met(gnorm):
                    break
            first_loss = self._loss_tensor(cache) if first_loss is None else first_loss
            g, x = cache["g"], cache["x"]
            if "subproblem" not in cache:
                gnorm = float(torch.linalg.vector_norm(g))
                tol = group["cg_tol"]
                if tol is None:
                    tol = min(0.5, math.sqrt(gnorm))
                maxiter = group["cg_maxiter"] or g.numel()
                cache["subproblem"] = cg_subproblem(
                    cache["hvp"],
                    g,
                    tol=tol,
                    maxiter=maxiter,
                    M=self.preconditioner,
                    reorthogonalize=False,  # mini-batch curvature: plain CG
                )
            holder: dict = {}
            res = trust_region_step(
                cache["loss"],
                g,
                st["radius"],
                cache["subproblem"],
                self._trial(closure, x, holder),
                eta=group["eta"],
                max_radius=group["max_radius"],
            )
            if self._model_failed(res.predicted_reduction, "quadratic"):
                break
            st["radius"] = res.radius
            sub = res.sub
            assert sub is not None  # a trust-region step carries its subproblem
            step_norm = sub.step_norm
            if res.accepted:  # the parameters are at the trial point
                loss_t = holder.get("loss_t")  # one trial per trust-region step: this one
                if res.grad is not None:
                    point = dict(loss=res.f, loss_t=loss_t, g=res.grad, hvp=res.product)
                else:
                    assert res.finish is not None  # an accepted step was tried
                    g_new, hvp_new = res.finish(True)
                    point = dict(loss=res.f, loss_t=loss_t, g=g_new, hvp=hvp_new)
                cache = dict(accepted=point)
                if group["extrapolation"] and res.rho > 1.1 and not sub.on_boundary:
                    self._extrapolate(closure, x, res.step, step_norm, res.f)
                    cache = {}  # the trial graphs were invalidated: evaluate afresh
                self._step_stalled(step_norm)
            else:
                self._set_flat(x)
                if st["radius"] <= group["tolerance_change"]:
                    st["stop_reason"] = (
                        f"stalled: trust radius {st['radius']:.3e} <= tolerance_change"
                    )
                st["n_rejected"] += 1
        return self._end(cache, closure, first_loss)
