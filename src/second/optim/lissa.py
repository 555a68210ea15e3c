r"""LiSSA as an optimizer: Newton steps from a stochastic Neumann-series inverse (Agarwal et al. 2016)."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from .._errors import ConvergenceWarning, outside_stacklevel
from ..operators.base import CallableOperator
from ..solvers import lissa_recursion
from ..spectral.lanczos import extreme_eigenvalues
from ._base import NewtonTypeOptimizer, flat_hvp
from ._options import check_int, check_nonneg, check_positive

__all__ = ["LiSSA"]

_BOUND_SLACK = 1.001  # rounding room on the bound ||X_j|| <= (j + 1) ||g||


class LiSSA(NewtonTypeOptimizer):
    r"""Newton's method with the inverse-Hessian-gradient product estimated by LiSSA.

    For a convex finite sum :math:`f = \frac1m \sum_i f_i` each step estimates
    :math:`(H + \lambda I)^{-1} g` by the stochastic Neumann recursion, repeated ``repeats``
    times and averaged,

    .. math:: X_0 = g, \qquad X_j = g + \Big(I - \frac{H_{i_j} + \lambda I}{s}\Big) X_{j-1},
              \qquad (H + \lambda I)^{-1} g \approx X_{\mathrm{depth}} / s,

    with :math:`H_{i_j}` the Hessian of a freshly sampled mini-batch (one
    ``curvature_closure()`` call per term) and :math:`s > \lambda_{\max}` a scale, then steps
    :math:`\theta \leftarrow \theta - \eta\, X / s`. The truncation leaves a relative bias of
    about :math:`(1 - (\lambda_{\min} + \lambda)/s)^{\mathrm{depth}}` along the flattest
    direction, so ``depth`` must grow with the condition number (as for
    :func:`second.lissa`). The scale is estimated by ``lanczos_steps`` Lanczos iterations
    on the full-batch Hessian at the first step (times ``scale_margin``, since mini-batch
    Hessians fluctuate above the mean), unless given.

    Divergence guards: while the spectrum of :math:`(H_{i_j} + \lambda I)/s` lies in
    :math:`[0, 2]`, every term of the series has norm at most :math:`\|g\|`, so
    :math:`\|X_j\| \le (j + 1)\|g\|`; an iterate beyond that bound (or not finite) means a
    sampled Hessian exceeds :math:`2s` or has negative curvature. And a step after which
    the loss (``closure``) is not finite or has risen by more than :math:`|L(\theta)|` (a
    positive loss more than doubled: mini-batch Hessians that miss directions make the
    series grow along them) is an exploding one. Either way the step is refused and the
    parameters restored, a :class:`~second.ConvergenceWarning` is issued, the state
    counters ``n_rejected`` and ``n_diverged`` grow, and an estimated scale is doubled for
    the next step, which shortens the steps (a given ``scale`` is kept).

    For convex problems (the recursion diverges on negative curvature: add ``damping``).
    The closures are torch.optim's (zero the gradients, compute the loss, call
    ``backward()``, return the loss); the optimizer runs the ``backward()`` itself, with the
    graph the Hessian-vector products need. A closure that returns the loss without calling
    ``backward()`` (the old form) still works until 0.3, with a ``DeprecationWarning``::

        def closure(Xb, yb):
            def run():
                opt.zero_grad()
                loss = loss_fn(model(Xb), yb)
                loss.backward()
                return loss
            return run

        i = idx()
        opt.step(closure(X, y), closure(X[i], y[i]))   # full gradient, a random mini-batch

    Args:
        params: parameters (one group; those that do not require grad are skipped).
        lr: step size :math:`\eta` (default 1.0).
        depth: recursion terms per estimate (default 100).
        repeats: independent estimates averaged (default 1).
        scale: :math:`s` (default ``None``: estimated).
        scale_margin: factor on the estimated :math:`\lambda_{\max}` (default 1.5).
        damping: :math:`\lambda \ge 0` (default 0).
        lanczos_steps: products for the scale estimate (default 20).
        gtol: stop when :math:`\|g\| \le` this (default 1e-7).
        **deprecated: ``tolerance_grad`` (removed in 0.3).

    Raises:
        ValueError: invalid hyperparameters.
        TypeError: an unknown keyword; at :meth:`step`, a closure that returns no scalar loss.

    State: counters ``n_iter, nfev, ngev, matvecs`` (``nhvp``: deprecated), ``n_rejected``, ``n_diverged``, ``loss``,
    ``grad_norm``, ``scale``, ``stop_reason``, ``history``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> X = torch.randn(256, 5, dtype=torch.float64); y = X @ torch.ones(5, dtype=torch.float64)
        >>> w = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        >>> opt = LiSSA([w], depth=200)
        >>> def closure(Xb, yb):
        ...     def run():
        ...         opt.zero_grad()
        ...         loss = ((Xb @ w - yb) ** 2).mean()
        ...         loss.backward()
        ...         return loss
        ...     return run
        >>> for _ in range(5):
        ...     i = torch.randint(0, 256, (32,))
        ...     _ = opt.step(closure(X, y), closure(X[i], y[i]))
        >>> bool((w - 1).abs().max() < 1e-2)
        True

    References:
        Agarwal, Bullins & Hazan (2017), *Second-order stochastic optimization for machine
        learning in linear time*, JMLR (arXiv 2016).
    """

    _renamed_defaults = dict(gtol=1e-7)

    def __init__(
        self,
        params,
        lr: float = 1.0,
        depth: int = 100,
        repeats: int = 1,
        scale: float | None = None,
        scale_margin: float = 1.5,
        damping: float = 0.0,
        lanczos_steps: int = 20,
        gtol: float = 1e-7,
        **deprecated,
    ):
        defaults = self._options(locals())
        check_positive("lr", lr)
        check_int("depth", depth)
        check_int("repeats", repeats)
        if scale is not None:
            check_positive("scale", scale)
        if not (isinstance(scale_margin, (int, float)) and scale_margin >= 1):
            raise ValueError(f"scale_margin must be >= 1, got {scale_margin!r}")
        check_nonneg("damping", damping)
        check_int("lanczos_steps", lanczos_steps, minimum=2)
        super().__init__(params, defaults)

    def _hvp(self, loss: Tensor):
        grads, _ = self._gradient(loss, create_graph=True)
        self._state["ngev"] -= 1  # the graph of a curvature sample is part of its product

        return flat_hvp(self, grads)

    @torch.no_grad()
    def step(  # type: ignore[override]  # closure required, loss returned as a tensor
        self, closure: Callable[[], Tensor], curvature_closure: Callable[[], Tensor] | None = None
    ) -> Tensor:
        """One LiSSA-Newton step.

        Args:
            closure: torch.optim's closure on the full batch.
            curvature_closure: the same on a freshly sampled mini-batch on every call (default:
                ``closure``, which makes the recursion a deterministic Neumann series).

        Returns:
            The loss before the step: the closure's tensor, detached (its dtype and device).

        Raises:
            NonFiniteError: the loss, or else its gradient, is not finite at the current
                point (the parameters are unchanged).
        """
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure")
        group = self.param_groups[0]
        st = self._state
        call = self._call(closure)
        loss = call.loss
        need_graph = curvature_closure is None or (
            st.get("scale") is None and group["scale"] is None
        )
        with torch.enable_grad():
            grads, g = self._gradient(loss, create_graph=need_graph)
        if call.backward:
            self._write_grad(g)
        f0 = float(loss.detach())
        gnorm = float(torch.linalg.vector_norm(g))
        st["loss"], st["grad_norm"] = f0, gnorm
        self._record()
        if gnorm <= group["gtol"]:
            st["stop_reason"] = f"converged: ||grad|| = {gnorm:.3e} <= gtol"
            return loss.detach()
        st["stop_reason"] = None
        lam = group["damping"]

        full = flat_hvp(self, grads)

        if group["scale"] is not None:
            st["scale"] = float(group["scale"])
        elif st.get("scale") is None:
            op = CallableOperator(full, g.numel(), g.dtype, g.device)
            _, hi = extreme_eigenvalues(op, steps=min(group["lanczos_steps"], g.numel()))
            st["scale"] = group["scale_margin"] * (max(hi, 0.0) + lam)
            if not st["scale"] > 0:
                raise ValueError(
                    "the estimated Hessian scale is not positive: the problem is "
                    "not convex here; pass scale= or damping="
                )
        s = st["scale"]

        def sample_product(X: Tensor) -> Tensor:
            if curvature_closure is None:
                return full(X)
            with torch.enable_grad():
                prod = self._hvp(self._call(curvature_closure).loss)
            return prod(X)

        # X_j sums j + 1 terms of norm <= ||g|| while the recursion contracts
        rec = lissa_recursion(
            g,
            sample_product,
            depth=group["depth"],
            scale=s,
            damping=lam,
            repeats=group["repeats"],
            bound=lambda j: (j + 1) * gnorm * _BOUND_SLACK,
        )
        st.setdefault("n_diverged", 0)
        if rec.diverged is not None:
            j, norm = rec.diverged
            self._refuse(
                s,
                f"the recursion diverged (||X_{j}|| = {norm:.3e} > {j + 1} ||g|| = "
                f"{(j + 1) * gnorm:.3e}): a mini-batch Hessian exceeds 2 * scale = {2 * s:.3e} "
                "or has negative curvature",
            )
            return loss.detach()
        step = rec.x
        assert step is not None  # the recursion did not diverge
        x = self._gather_flat()
        self._add_flat(step, alpha=-group["lr"])
        try:
            f_new = self._value(closure)
        except BaseException:
            self._set_flat(x)
            raise
        if not f_new - f0 <= abs(f0):  # also not finite
            self._set_flat(x)
            self._refuse(
                s,
                f"the step (norm {float(torch.linalg.vector_norm(step)) * group['lr']:.3e}) "
                f"raised the loss from {f0:.6e} to {f_new:.6e}",
            )
            return loss.detach()
        st["n_iter"] += 1
        return loss.detach()

    def _refuse(self, s: float, why: str) -> None:
        st, group = self._state, self.param_groups[0]
        st["n_rejected"] += 1
        st["n_diverged"] += 1
        if group["scale"] is None:
            st["scale"] = 2.0 * s
        warnings.warn(
            f"LiSSA step refused: {why}. The parameters are unchanged; "
            + (
                "the estimated scale is doubled."
                if group["scale"] is None
                else "raise scale (or damping)."
            ),
            ConvergenceWarning,
            stacklevel=outside_stacklevel(),
        )
