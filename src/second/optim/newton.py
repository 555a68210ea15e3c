r"""Trust-region Newton-CG (Steihaug-Toint) on the exact Hessian."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..func.products import hvp_from_gradient
from ..newton.trust_region import steihaug_cg, update_radius
from ._base import NewtonTypeOptimizer, check_int, check_nonneg, check_positive, check_unit

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
    unless ``cg_rtol`` is given.

    For deterministic, full-batch problems: the closure must return the same function of
    the parameters every time it is called. Pass the same closure object on every call:
    the evaluation that ends one call (the accepted trial point, or the stored CG path after
    a rejection) is then reused by the next; a different closure object, or parameters
    changed in between, trigger a fresh evaluation.

    The closure re-evaluates the model and returns the scalar loss *with its graph*; it
    should not call ``backward()`` (the optimizer differentiates the loss itself and does
    not read or write ``.grad``)::

        def closure():
            return loss_fn(model(X), y)

    Args:
        params: parameters to optimize (one group).
        initial_radius: :math:`\Delta_0` (default 1.0).
        max_radius: largest radius (default 1e10).
        eta: acceptance threshold on :math:`\rho`, in :math:`[0, 1/4)` (default 0.1).
        max_iter: trust-region iterations per :meth:`step` call (default 1).
        cg_max_iter: CG iterations per subproblem (default: the number of parameters).
        cg_rtol: fixed relative CG tolerance (default ``None``: the forcing sequence).
        tolerance_grad: stop when :math:`\|g\|_2 \le` this (default 1e-7).
        tolerance_change: stop when an accepted step or the radius is smaller (default 1e-12).
        preconditioner: optional ``M`` with :math:`M \approx H^{-1}` symmetric positive definite,
            a callable on flat vectors or a :class:`~second.LinearOperator`; the trust region
            becomes :math:`\|p\|_{M^{-1}} \le \Delta`.
        extrapolation: after an accepted interior step whose actual reduction beats the
            model's by 10% (:math:`\rho > 1.1`, typical of valleys that flatten out, e.g.
            saturating units), try up to this many doublings of the step, keeping the best
            (loss evaluations only; default 0: off).

    Raises:
        ValueError: invalid hyperparameters, or several parameter groups.

    State (``optimizer.state[first_param]``, see :class:`NewtonTypeOptimizer`): counters
    ``n_iter, nfev, ngev, nhvp``, ``loss``, ``grad_norm``, ``radius``, ``stop_reason``,
    ``history``.

    Example:
        >>> x = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
        >>> opt = NewtonCG([x], max_iter=100, tolerance_grad=1e-10)
        >>> _ = opt.step(lambda: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2)
        >>> opt.stop_reason.startswith("converged"), torch.allclose(x, torch.ones(2, dtype=x.dtype))
        (True, True)

    References:
        Steihaug (1983); Nocedal & Wright, *Numerical Optimization*, Algorithms 4.1 and 7.2.
    """

    def __init__(
        self,
        params,
        initial_radius: float = 1.0,
        max_radius: float = 1e10,
        eta: float = 0.1,
        max_iter: int = 1,
        cg_max_iter: int | None = None,
        cg_rtol: float | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-12,
        preconditioner: Callable[[Tensor], Tensor] | None = None,
        extrapolation: int = 0,
    ):
        check_positive("initial_radius", initial_radius)
        check_positive("max_radius", max_radius)
        if initial_radius > max_radius:
            raise ValueError(f"initial_radius {initial_radius} exceeds max_radius {max_radius}")
        if not (isinstance(eta, (int, float)) and 0 <= eta < 0.25):
            raise ValueError(f"eta must lie in [0, 0.25), got {eta!r}")
        check_int("max_iter", max_iter)
        if cg_max_iter is not None:
            check_int("cg_max_iter", cg_max_iter)
        if cg_rtol is not None:
            check_unit("cg_rtol", cg_rtol)
        check_nonneg("tolerance_grad", tolerance_grad)
        check_nonneg("tolerance_change", tolerance_change)
        check_int("extrapolation", extrapolation, minimum=0)
        if preconditioner is not None and not callable(preconditioner):
            raise ValueError("preconditioner must be callable (flat vector -> flat vector)")
        defaults = dict(
            initial_radius=initial_radius,
            max_radius=max_radius,
            eta=eta,
            max_iter=max_iter,
            cg_max_iter=cg_max_iter,
            cg_rtol=cg_rtol,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            extrapolation=extrapolation,
        )
        super().__init__(params, defaults)
        self.preconditioner = preconditioner

    def _hvp_fn(self, grads):
        params, st = self._params, self._state

        def hvp(v: Tensor) -> Tensor:
            st["nhvp"] += 1
            out = hvp_from_gradient(grads, params, self._split(v))
            return torch.cat([t.reshape(-1) for t in out])

        return hvp

    def _extrapolate(self, closure, x: Tensor, sub, f_new: float, new_loss: Tensor) -> dict:
        """Double an interior step while the loss keeps falling (the model under-predicts)."""
        st, group = self._state, self.param_groups[0]
        best_f, best_k = f_new, 0
        for k in range(1, group["extrapolation"] + 1):
            self._set_flat(x + (2.0**k) * sub.step)
            out = closure()
            st["nfev"] += 1
            f_k = float(out.detach())
            if not f_k < best_f:
                break
            best_f, best_k = f_k, k
        st["n_extrapolated"] = st.get("n_extrapolated", 0) + (best_k > 0)
        self._set_flat(x + (2.0**best_k) * sub.step)
        st["radius"] = max(st["radius"], (2.0**best_k) * sub.step_norm)
        return {}  # the trial graphs were invalidated: evaluate afresh

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """Perform up to ``max_iter`` trust-region iterations.

        Args:
            closure: re-evaluates the model and returns the loss with its graph.

        Returns:
            The loss at the start of the call (detached).
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        raw_closure = closure
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        st = self._state
        st.setdefault("radius", float(group["initial_radius"]))
        same = (
            self._cache.get("versions") == self._versions()
            and self._cache.get("closure") is raw_closure
        )
        cache = self._cache if same else {}
        if not cache:
            st["stop_reason"] = None
        first_loss = None
        for _ in range(group["max_iter"]):
            if st["stop_reason"] is not None:
                break
            if "g" not in cache:
                loss = cache.pop("loss_tensor", None)
                if loss is None:
                    loss = closure()
                    st["nfev"] += 1
                grads, g = self._gradient(loss, create_graph=True)
                cache = dict(loss=float(loss.detach()), grads=grads, g=g, x=self._gather_flat())
                gnorm = float(torch.linalg.vector_norm(g))
                st["loss"], st["grad_norm"] = cache["loss"], gnorm
                self._record(radius=st["radius"])
                if not (math.isfinite(cache["loss"]) and math.isfinite(gnorm)):
                    st["stop_reason"] = (
                        f"the objective or its gradient is not finite at the current point "
                        f"(loss {cache['loss']}, ||grad|| {gnorm}): not a minimum"
                    )
                    if first_loss is None:
                        first_loss = cache["loss"]
                    break
                if gnorm <= group["tolerance_grad"]:
                    st["stop_reason"] = (
                        f"converged: ||grad|| = {gnorm:.3e} <= tolerance_grad "
                        f"= {group['tolerance_grad']:.1e}"
                    )
                    if first_loss is None:
                        first_loss = cache["loss"]
                    break
            if first_loss is None:
                first_loss = cache["loss"]
            g = cache["g"]
            gnorm = float(torch.linalg.vector_norm(g))
            radius = st["radius"]
            if "path" in cache:
                sub = cache["path"].cut(radius)
            else:
                rtol = group["cg_rtol"]
                if rtol is None:
                    rtol = min(0.5, math.sqrt(gnorm))
                with torch.enable_grad():
                    sub = steihaug_cg(
                        self._hvp_fn(cache.pop("grads")),
                        g,
                        radius,
                        rtol=rtol,
                        maxiter=group["cg_max_iter"] or g.numel(),
                        M=self.preconditioner,
                    )
                cache["path"] = sub.path
            st["n_iter"] += 1
            if not sub.predicted_reduction > 0:
                st["stop_reason"] = "stalled: the quadratic model predicts no decrease"
                break
            x = cache["x"]
            self._set_flat(x + sub.step)
            new_loss = closure()
            st["nfev"] += 1
            f_new = float(new_loss.detach())
            actual = cache["loss"] - f_new
            rho = actual / sub.predicted_reduction if math.isfinite(f_new) else -math.inf
            st["radius"] = update_radius(
                radius, rho, sub.step_norm, sub.on_boundary, max_radius=group["max_radius"]
            )
            if rho > group["eta"]:
                cache = dict(loss_tensor=new_loss)
                if group["extrapolation"] and rho > 1.1 and not sub.on_boundary:
                    cache = self._extrapolate(raw_closure, x, sub, f_new, new_loss)
                if sub.step_norm <= group["tolerance_change"]:
                    st["stop_reason"] = (
                        f"stalled: step norm {sub.step_norm:.3e} <= tolerance_change"
                    )
            else:
                self._set_flat(x)
                if st["radius"] <= group["tolerance_change"]:
                    st["stop_reason"] = (
                        f"stalled: trust radius {st['radius']:.3e} <= tolerance_change"
                    )
                st["n_rejected"] += 1
        cache["versions"] = self._versions()
        cache["closure"] = raw_closure
        self._cache = cache
        if first_loss is None:
            first_loss = st["loss"] if st["loss"] is not None else float("nan")
        return torch.tensor(first_loss)
