r"""Gauss-Newton / Levenberg-Marquardt on the generalized Gauss-Newton matrix."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..func.products import GGNGraph, check_scalar_loss
from ..newton.globalize import lm_damping_update
from ..newton.model_cg import model_cg
from ._base import NewtonTypeOptimizer, check_int, check_nonneg, check_positive, check_unit

__all__ = ["GaussNewton", "unpack_closure_output", "lm_damping_update"]


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
    (:func:`lm_damping_update`): it falls on good steps and rises, ever faster, on
    rejected ones. :math:`G` is positive semi-definite for losses convex in the output
    (MSE, cross-entropy), so the method is the natural one for least squares and
    cross-entropy.

    Full-batch use: pass the same closure object on every call, and the evaluation at the
    accepted trial point is reused by the next call. Mini-batch use: a new closure object
    (a new batch) triggers a fresh evaluation at the start of the call.

    The closure returns ``(loss, output)``: the scalar loss and the network output it was
    computed from, both with their graph, without calling ``backward()``::

        def closure():
            out = model(X)
            return loss_fn(out, y), out

    Args:
        params: parameters (one group).
        damping: initial :math:`\lambda` (default 1e-3).
        min_damping: floor for :math:`\lambda` (default 1e-12).
        max_damping: ceiling; reaching it stops the optimizer (default 1e12).
        eta: acceptance threshold on :math:`\rho` (default 1e-4).
        solver: ``"cg"`` (default) or ``"dense"``.
        max_iter: LM iterations per :meth:`step` call (default 1).
        cg_max_iter: CG iterations per solve (default: ``min(P, 250)``).
        cg_rtol: fixed relative CG tolerance (default ``None``: ``min(0.5, sqrt(||g||))``).
        tolerance_grad: stop when :math:`\|g\| \le` this (default 1e-7).
        tolerance_change: stop when an accepted step is smaller (default 1e-12).

    Raises:
        ValueError: invalid hyperparameters.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 1).double()
        >>> X = torch.randn(20, 3, dtype=torch.float64); y = X.sum(1, keepdim=True)
        >>> opt = GaussNewton(model.parameters(), max_iter=20, damping=1e-8)
        >>> def closure():
        ...     out = model(X)
        ...     return torch.nn.functional.mse_loss(out, y), out
        >>> _ = opt.step(closure)
        >>> opt.converged
        True

    References:
        Levenberg (1944); Marquardt (1963); Nielsen (1999), *Damping parameter in Marquardt's
        method*; Schraudolph (2002) for the generalized Gauss-Newton matrix.
    """

    def __init__(
        self,
        params,
        damping: float = 1e-3,
        min_damping: float = 1e-12,
        max_damping: float = 1e12,
        eta: float = 1e-4,
        solver: str = "cg",
        max_iter: int = 1,
        cg_max_iter: int | None = None,
        cg_rtol: float | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-12,
    ):
        check_positive("damping", damping)
        check_positive("min_damping", min_damping)
        check_positive("max_damping", max_damping)
        if not min_damping <= damping <= max_damping:
            raise ValueError(f"damping {damping} must lie in [min_damping, max_damping]")
        if not (isinstance(eta, (int, float)) and 0 <= eta < 1):
            raise ValueError(f"eta must lie in [0, 1), got {eta!r}")
        if solver not in ("cg", "dense"):
            raise ValueError(f"solver must be 'cg' or 'dense', got {solver!r}")
        check_int("max_iter", max_iter)
        if cg_max_iter is not None:
            check_int("cg_max_iter", cg_max_iter)
        if cg_rtol is not None:
            check_unit("cg_rtol", cg_rtol)
        check_nonneg("tolerance_grad", tolerance_grad)
        check_nonneg("tolerance_change", tolerance_change)
        defaults = dict(
            damping=damping,
            min_damping=min_damping,
            max_damping=max_damping,
            eta=eta,
            solver=solver,
            max_iter=max_iter,
            cg_max_iter=cg_max_iter,
            cg_rtol=cg_rtol,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
        )
        super().__init__(params, defaults)

    # -- curvature -----------------------------------------------------------------------
    def _graph(self, cache, closure) -> GGNGraph:
        if "graph" not in cache:
            pair = cache.pop("pair", None)
            if pair is None:  # the point's graph was consumed by a rejected trial
                pair = unpack_closure_output(closure())
                self._state["nfev"] += 1
            loss, out = pair
            with torch.enable_grad():
                cache["graph"] = GGNGraph(loss, out, self._params)
        return cache["graph"]

    def _gvp(self, graph: GGNGraph, v: Tensor) -> Tensor:
        self._state["nhvp"] += 1
        with torch.enable_grad():
            out = graph.gvp(self._split(v))
        return torch.cat([t.reshape(-1) for t in out])

    def _dense(self, cache, closure):
        if "eig" not in cache:
            graph = self._graph(cache, closure)
            n = cache["g"].numel()
            eye = torch.eye(n, dtype=cache["g"].dtype, device=cache["g"].device)
            cols = []
            for start in range(0, n, 256):
                E = eye[start : start + 256]
                vs = [t for t in self._split_batched(E)]
                with torch.enable_grad():
                    out = graph.gvp(vs, batched=True)
                cols.append(torch.cat([t.reshape(t.shape[0], -1) for t in out], dim=1))
            self._state["nhvp"] += n
            G = torch.cat(cols, dim=0).to(torch.float64)
            cache["eig"] = torch.linalg.eigh(0.5 * (G + G.T))
        return cache["eig"]

    def _split_batched(self, E: Tensor) -> list[Tensor]:
        out, offset = [], 0
        for p in self._params:
            n = p.numel()
            out.append(E[:, offset : offset + n].reshape(E.shape[0], *p.shape))
            offset += n
        return out

    def _solve(self, cache, closure, damping: float, gnorm: float) -> tuple[Tensor, float]:
        """The step and the predicted reduction ``-(g.d + d.G d / 2)``."""
        group = self.param_groups[0]
        g = cache["g"]
        if group["solver"] == "dense":
            lam, Q = self._dense(cache, closure)
            c = Q.T @ g.to(torch.float64)
            w = -c / (lam.clamp_min(0) + damping)
            d = (Q @ w).to(g.dtype)
            pred = -float(c @ w + 0.5 * (lam.clamp_min(0) * w * w).sum())
            return d, pred
        graph = self._graph(cache, closure)
        rtol = group["cg_rtol"]
        if rtol is None:
            rtol = min(0.5, math.sqrt(gnorm))
        maxiter = group["cg_max_iter"] or min(g.numel(), 250)
        res = model_cg(lambda v: self._gvp(graph, v) + damping * v, g, maxiter=maxiter, rtol=rtol)
        d = res.x
        # phi = g.d + d.(G + lam I)d / 2, so the undamped model is phi - lam ||d||^2 / 2
        pred = -(res.phi - 0.5 * damping * float(torch.dot(d, d)))
        return d, pred

    # -- step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], tuple[Tensor, Tensor]]) -> Tensor:
        """Perform up to ``max_iter`` Levenberg-Marquardt iterations.

        Args:
            closure: returns ``(loss, output)`` with their graph.

        Returns:
            The loss at the start of the call (detached).
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure returning (loss, output)")
        raw_closure = closure
        closure = torch.enable_grad()(closure)
        group = self.param_groups[0]
        st = self._state
        st.setdefault("damping", float(group["damping"]))
        st.setdefault("nu", 2.0)
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
                pair = cache.pop("pair", None)
                if pair is None:
                    pair = unpack_closure_output(closure())
                    st["nfev"] += 1
                loss = pair[0]
                with torch.enable_grad():
                    _, g = self._gradient(loss, create_graph=False, retain_graph=True)
                cache = dict(loss=float(loss.detach()), pair=pair, g=g, x=self._gather_flat())
                gnorm = float(torch.linalg.vector_norm(g))
                st["loss"], st["grad_norm"] = cache["loss"], gnorm
                self._record(damping=st["damping"])
                if gnorm <= group["tolerance_grad"]:
                    st["stop_reason"] = (
                        f"converged: ||grad|| = {gnorm:.3e} <= tolerance_grad "
                        f"= {group['tolerance_grad']:.1e}"
                    )
                    first_loss = cache["loss"] if first_loss is None else first_loss
                    break
            first_loss = cache["loss"] if first_loss is None else first_loss
            g = cache["g"]
            gnorm = float(torch.linalg.vector_norm(g))
            damping = st["damping"]
            d, pred = self._solve(cache, closure, damping, gnorm)
            st["n_iter"] += 1
            if not pred > 0:
                st["stop_reason"] = "stalled: the Gauss-Newton model predicts no decrease"
                break
            x = cache["x"]
            self._set_flat(x + d)
            try:  # a non-finite trial loss rejects the step below
                new_pair = unpack_closure_output(closure(), finite=False)
            except BaseException:
                self._set_flat(x)  # never leave the parameters at a trial point
                raise
            st["nfev"] += 1
            f_new = float(new_pair[0].detach())
            rho = (cache["loss"] - f_new) / pred if math.isfinite(f_new) else -math.inf
            accepted = rho > group["eta"]
            lam, nu = lm_damping_update(damping, st["nu"], rho if accepted else -1.0)
            st["damping"] = min(max(lam, group["min_damping"]), group["max_damping"])
            st["nu"] = nu
            if accepted:
                step_norm = float(torch.linalg.vector_norm(d))
                cache = dict(pair=new_pair)
                if step_norm <= group["tolerance_change"]:
                    st["stop_reason"] = f"stalled: step norm {step_norm:.3e} <= tolerance_change"
            else:
                self._set_flat(x)
                st["n_rejected"] += 1
                cache.pop("graph", None)  # in-place parameter updates invalidate its graph
                cache.pop("pair", None)
                if lam >= group["max_damping"]:
                    st["stop_reason"] = "stalled: damping reached max_damping"
        cache["versions"] = self._versions()
        cache["closure"] = raw_closure
        self._cache = cache
        if first_loss is None:
            first_loss = st["loss"] if st["loss"] is not None else float("nan")
        return torch.tensor(first_loss)
