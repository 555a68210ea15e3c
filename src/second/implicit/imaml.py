r"""iMAML: meta-gradients of proximally regularized inner problems (Rajeswaran et al., 2019).

Each task adapts the meta-parameters :math:`\theta` by solving

.. math::

    w^*(\theta) = \arg\min_w\; L_\mathrm{task}(w) + \frac{\lambda}{2}\|w - \theta\|^2,

and the meta-gradient of a test loss follows from the implicit function theorem,

.. math::

    \frac{\mathrm{d} L_\mathrm{test}(w^*)}{\mathrm{d}\theta}
    = \Big(I + \frac{1}{\lambda}\nabla^2 L_\mathrm{task}(w^*)\Big)^{-1}
      \nabla L_\mathrm{test}(w^*),

solved matrix-free by conjugate gradient. The inner iterations are never
differentiated, so memory does not grow with their number (unlike unrolled MAML).

Parameters (``theta``, adapted ``params``) are tensors, tuples/lists or dicts of
tensors; ``task_loss(params)`` and ``test_loss(params)`` receive that layout (use
:func:`torch.func.functional_call` for an ``nn.Module``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..func.attention import differentiable_attention
from ..func.products import check_finite, hessian_matvec
from ..func.vectors import parameters_to_vector, vector_to_parameters
from ..solvers import SolveResult
from ._linear import solve_options, solve_symmetric
from ._structure import detached_leaves, flatten, refuse_frozen, zeros_for_none

__all__ = ["proximal", "adapt", "meta_gradient", "MetaGradient"]


class MetaGradient(NamedTuple):
    """What :func:`meta_gradient` returns.

    Attributes:
        grad: the meta-gradient, laid out like ``params``.
        solve: the :class:`~second.SolveResult` of the linear solve (``solve.matvecs``
            Hessian-vector products).
    """

    grad: Any
    solve: SolveResult


def proximal(task_loss: Callable[[Any], Tensor], lam: float) -> Callable[[Any, Any], Tensor]:
    r"""Build the iMAML inner objective :math:`L(w) + \tfrac{\lambda}{2}\|w-\theta\|^2`.

    Args:
        task_loss: ``task_loss(params) -> scalar`` (the support-set loss).
        lam: the proximal strength :math:`\lambda > 0`.

    Returns:
        ``inner_loss(params, theta)``, usable with :func:`second.hypergradient`.

    Raises:
        ValueError: ``lam <= 0``.

    Example:
        >>> f = proximal(lambda w: (w ** 2).sum(), lam=2.0)
        >>> f(torch.ones(2), torch.zeros(2))      # 2 + 2/2 * 2
        tensor(4.)
    """
    _check_lam(lam)

    def inner_loss(params, theta):
        w_leaves, _ = flatten(params, "params")
        t_leaves, _ = flatten(theta, "theta")
        if len(w_leaves) != len(t_leaves):
            raise ValueError(f"params has {len(w_leaves)} tensors, theta {len(t_leaves)}")
        prox = sum(((w - t) ** 2).sum() for w, t in zip(w_leaves, t_leaves, strict=True))
        return task_loss(params) + 0.5 * lam * prox

    return inner_loss


def adapt(
    task_loss: Callable[[Any], Tensor],
    theta: Any,
    lam: float,
    *,
    steps: int = 16,
    lr: float = 0.01,
    momentum: float = 0.0,
) -> Any:
    r"""Approximately solve the proximal inner problem by gradient descent from :math:`\theta`.

    Runs ``steps`` iterations of (heavy-ball) gradient descent on
    :math:`L_\mathrm{task}(w) + \frac{\lambda}{2}\|w-\theta\|^2` starting at
    :math:`w_0 = \theta`. No graph is kept between iterations: memory is that of one
    gradient, whatever ``steps`` is.

    Args:
        task_loss: ``task_loss(params) -> scalar``.
        theta: meta-parameters (tensor, tuple/list or dict of tensors).
        lam: proximal strength :math:`\lambda > 0`.
        steps: number of iterations (default 16).
        lr: step size (default 0.01).
        momentum: heavy-ball momentum in ``[0, 1)`` (default 0).

    Returns:
        The adapted parameters, laid out like ``theta``, detached.

    Raises:
        ValueError: ``lam <= 0``, ``steps < 0``, ``lr <= 0``, ``momentum`` outside ``[0, 1)``,
            or ``theta`` holds a frozen parameter (an ``nn.Parameter`` with
            ``requires_grad=False``: a constant, leave it out of ``theta``).

    Example:
        >>> w = adapt(lambda w: ((w - 3.0) ** 2).sum(), torch.zeros(1), lam=2.0, steps=200, lr=0.1)
        >>> round(float(w), 6)                       # argmin (w-3)^2 + (w-0)^2 = 1.5
        1.5
    """
    _check_lam(lam)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    t_leaves, struct = flatten(theta, "theta")
    refuse_frozen(t_leaves, struct.names, "theta")
    anchors = [t.detach() for t in t_leaves]
    ws = [t.clone() for t in anchors]
    bufs = [torch.zeros_like(t) for t in anchors]
    for _ in range(steps):
        cur = detached_leaves(ws)
        with torch.enable_grad():
            loss = task_loss(struct.unflatten(cur))
            grads = torch.autograd.grad(loss, cur, allow_unused=True)
        with torch.no_grad():
            for w, g, a, buf in zip(ws, grads, anchors, bufs, strict=True):
                d = lam * (w - a) if g is None else g + lam * (w - a)
                if momentum:
                    buf.mul_(momentum).add_(d)
                    d = buf
                w.sub_(d, alpha=lr)
    return struct.unflatten(ws)


def meta_gradient(
    task_loss: Callable[[Any], Tensor],
    test_loss: Callable[[Any], Tensor],
    params: Any,
    lam: float,
    *,
    method: str = "auto",
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float = 0.0,
    warn: bool = True,
) -> MetaGradient:
    r"""Compute the iMAML meta-gradient :math:`(I + H/\lambda)^{-1}\nabla L_\mathrm{test}(w)`.

    :math:`H = \nabla^2 L_\mathrm{task}(w)` at the adapted ``params`` :math:`w`. The
    system is solved matrix-free by conjugate gradient (``method="auto"``; MINRES if
    :math:`I + H/\lambda` has non-positive curvature), each product costing one
    backward pass through the task loss's gradient graph. This equals
    :func:`second.hypergradient` of the test loss through :func:`proximal` (with
    respect to :math:`\theta`), without the mixed-derivative pass.

    Args:
        task_loss: ``task_loss(params) -> scalar``, the support-set loss.
        test_loss: ``test_loss(params) -> scalar``, the query-set loss.
        params: the adapted parameters (e.g. from :func:`adapt`), used detached.
        lam: proximal strength :math:`\lambda > 0`.
        method: ``"auto"``, ``"cg"``, ``"minres"``, ``"dense"`` or ``"neumann"``.
        tol: relative residual tolerance (default ``1e-10`` in float64, ``1e-5`` in float32).
        atol: absolute residual tolerance.
        maxiter: iteration limit (iMAML uses a handful of CG steps; pass ``warn=False``
            to accept a truncated solve silently).
        damping: extra :math:`\mu \ge 0`: solves :math:`(I + H/\lambda + \mu I) x = g`.
        warn: warn about unconverged solves and negative curvature.

    Returns:
        A :class:`MetaGradient` ``(grad, solve)``: the meta-gradient laid out like
        ``params`` and the :class:`~second.SolveResult` (a named tuple, so
        ``grad, solve = meta_gradient(...)`` works as before).

    Raises:
        ValueError: ``lam <= 0``, a parameter not in the graph of ``task_loss``, a frozen
            parameter in ``params`` (an ``nn.Parameter`` with ``requires_grad=False``: a
            constant, leave it out), or ``damping`` negative or not finite.

    Example:
        >>> task = lambda w: 0.5 * 3.0 * (w ** 2).sum()     # H = 3 I
        >>> test = lambda w: w.sum()                        # grad = 1
        >>> g, res = meta_gradient(task, test, torch.zeros(2, dtype=torch.float64), lam=1.0)
        >>> g                                               # 1 / (1 + 3/1)
        tensor([0.2500, 0.2500], dtype=torch.float64)
    """
    options = solve_options(locals())
    _check_lam(lam)
    w_leaves, struct = flatten(params, "params")
    refuse_frozen(w_leaves, struct.names, "params")
    ws = detached_leaves(w_leaves)
    with torch.enable_grad():
        w_in = struct.unflatten(ws)
        L_test = test_loss(w_in)
        g_test = torch.autograd.grad(L_test, ws, allow_unused=True)
        b = parameters_to_vector(zeros_for_none(ws, g_test))
        check_finite(b, "the gradient of test_loss")
        with differentiable_attention():  # differentiated twice: no fused attention kernel
            L_task = task_loss(w_in)
        g_task = torch.autograd.grad(L_task, ws, create_graph=True, allow_unused=True)
        for name, g in zip(struct.names, g_task, strict=True):
            if g is None:
                raise ValueError(f"{name} is not in the graph of task_loss")

        hvp = hessian_matvec(g_task, ws)

        def matvec(v: Tensor) -> Tensor:
            return v + hvp(v) / lam

        res = solve_symmetric(matvec, b, **options, what="I + H/lambda")
    x = res.x if isinstance(res.x, Tensor) else parameters_to_vector(res.x)
    grad = struct.unflatten([t.clone() for t in vector_to_parameters(x.detach(), ws)])
    res.x = grad
    return MetaGradient(grad, res)


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, (int, float)) and lam > 0 and lam < float("inf")):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
