r"""Hypergradients of bilevel problems by the implicit function theorem."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..func.attention import differentiable_attention
from ..func.products import check_finite, hessian_matvec
from ..func.vectors import parameters_to_vector, vector_to_parameters
from ..solvers import SolveResult
from ._linear import newton_step, solve_options, solve_symmetric, warn_if_unsolved
from ._structure import detached_leaves, flatten, refuse_frozen

__all__ = ["hypergradient", "HypergradientResult"]


@dataclass
class HypergradientResult:
    r"""What :func:`hypergradient` returns.

    Attributes:
        grad: :math:`\mathrm{d} L_\mathrm{out} / \mathrm{d} h`, laid out like ``hparams``.
        solve: the :class:`~second.SolveResult` of the linear solve
            :math:`(\nabla^2_w L_\mathrm{in} + \lambda I)\, v = \nabla_w L_\mathrm{out}`;
            ``solve.x`` is :math:`v` (laid out like ``params``) and ``solve.matvecs``
            the number of Hessian-vector products.
        inner_residual: :math:`\|\nabla_w L_\mathrm{in}(w, h)\|`, the inner optimality
            residual at the given ``params`` (zero at an exact inner optimum).
        outer_loss: the value of the outer loss.
        inner_loss: the value of the inner loss.
        direct: the explicit part :math:`\partial L_\mathrm{out} / \partial h`, laid out
            like ``hparams``.
        info: ``"newton_step"``, the estimate of
            :math:`\|(\nabla^2_w L_\mathrm{in} + \lambda I)^{-1} \nabla_w L_\mathrm{in}\|`
            behind ``inner_tol`` (present when that check ran), and ``"params_norm"``,
            :math:`\|w\|`.
    """

    grad: Any
    solve: SolveResult
    inner_residual: float
    outer_loss: float
    inner_loss: float
    direct: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def hypergradient(
    inner_loss: Callable[[Any, Any], Tensor],
    outer_loss: Callable[[Any, Any], Tensor],
    params: Any,
    hparams: Any,
    *,
    method: str = "auto",
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float = 0.0,
    x0: Any = None,
    inner_tol: float | None = 1e-4,
    warn: bool = True,
) -> HypergradientResult:
    r"""Differentiate an outer loss through the optimum of an inner problem (implicit functions).

    For :math:`w^*(h) = \arg\min_w L_\mathrm{in}(w, h)` the optimality condition
    :math:`\nabla_w L_\mathrm{in}(w^*, h) = 0` gives

    .. math::

        \frac{\mathrm{d} L_\mathrm{out}(w^*(h), h)}{\mathrm{d} h}
        = \frac{\partial L_\mathrm{out}}{\partial h}
        - \frac{\partial^2 L_\mathrm{in}}{\partial h\, \partial w}
          \Big(\frac{\partial^2 L_\mathrm{in}}{\partial w^2} + \lambda I\Big)^{-1}
          \frac{\partial L_\mathrm{out}}{\partial w},

    evaluated at the given ``params`` :math:`w \approx w^*` (any inner solver; its
    iterations are not differentiated, so memory does not grow with them). The
    linear system is solved matrix-free: the gradient graph of the inner loss is
    built once and every Hessian-vector product is one backward pass through it,
    and the mixed term is one more.

    The solve: ``method="auto"`` (default) runs conjugate gradient, which needs the
    inner Hessian to be positive definite (true at a strict minimum). If CG meets
    non-positive curvature, ``params`` is not at a strict minimum: a
    :class:`~second.NegativeCurvatureWarning` is raised and the solve restarts with
    MINRES, which handles indefinite systems. ``"cg"``, ``"minres"``, ``"dense"``
    and ``"neumann"`` (Lorraine et al.) use that method of :func:`second.solve`.
    Normal-equation CG is never used: it squares the condition number.

    Args:
        inner_loss: ``inner_loss(params, hparams) -> scalar``, called with tensors laid
            out like ``params`` and ``hparams``.
        outer_loss: ``outer_loss(params, hparams) -> scalar`` (e.g. a validation loss;
            it may ignore ``hparams``).
        params: the (approximate) inner optimum: a tensor, a tuple/list of tensors or a
            dict of tensors (e.g. ``dict(model.named_parameters())``). Used detached.
        hparams: the hyperparameters, a tensor, tuple/list or dict of floating tensors.
        method: ``"auto"``, ``"cg"``, ``"minres"``, ``"dense"`` or ``"neumann"``.
        tol: relative residual tolerance of the linear solve (default ``1e-10`` in
            float64, ``1e-5`` in float32).
        atol: absolute residual tolerance (default 0).
        maxiter: iteration limit of the solve (the solver's default when ``None``).
        damping: :math:`\lambda \ge 0` added to the inner Hessian (explicit Tikhonov
            damping; biases the result, makes an ill-conditioned solve stable).
        x0: warm start for :math:`v`, laid out like ``params`` (e.g. the previous
            ``result.solve.x`` in a hyperparameter loop).
        inner_tol: relative accuracy the inner solution must have: warn
            (:class:`~second.ConvergenceWarning`) when the Newton step
            :math:`\delta = (\nabla^2_w L_\mathrm{in} + \lambda I)^{-1} \nabla_w L_\mathrm{in}`,
            the estimated distance :math:`w - w^*`, has
            :math:`\|\delta\| > \mathrm{inner\_tol}\,\|w\|`. The error of the
            hypergradient is first order in :math:`\delta`; the test does not change when
            the inner loss is multiplied by a constant (a mean over more data) or the
            parameters are rescaled, unlike one on :math:`\|\nabla_w L_\mathrm{in}\|`.
            The step is one more solve with the inner Hessian, to relative residual
            ``1e-2`` (CG, MINRES on negative curvature), run only when the inner gradient is
            nonzero; ``None`` (or ``warn=False``) skips the check and its cost.
        warn: warn about unconverged solves, negative curvature and an unsolved inner
            problem (``inner_tol``) (default ``True``).

    Returns:
        A :class:`HypergradientResult` with ``grad`` (laid out like ``hparams``),
        ``solve`` and ``inner_residual``.

    Raises:
        TypeError: ``params``/``hparams`` are not tensors, sequences or dicts of tensors,
            or a loss is not a tensor.
        ValueError: a loss is not a scalar, a parameter is not in the graph of
            ``inner_loss``, a hyperparameter is not in the graph of ``inner_loss``,
            ``outer_loss`` depends on neither, ``params`` holds a frozen parameter (an
            ``nn.Parameter`` with ``requires_grad=False``, e.g. from
            ``dict(model.named_parameters())``: a constant, leave it out of ``params``), or
            ``damping`` is negative or not finite.
        NonFiniteError: a product or the gradient has NaN or Inf entries.

    Example:
        Ridge regression, :math:`L_\mathrm{in} = \tfrac12\|Xw-y\|^2 + \tfrac{e^h}{2}\|w\|^2`,
        outer loss :math:`\tfrac12\|w\|^2`:

        >>> X = torch.eye(2, dtype=torch.float64); y = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> h = torch.tensor(0.0, dtype=torch.float64)
        >>> inner = lambda w, h: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * h.exp() * (w ** 2).sum()
        >>> outer = lambda w, h: 0.5 * (w ** 2).sum()
        >>> w_star = y / (1 + h.exp())                 # closed form: w* = y / (1 + e^h)
        >>> res = hypergradient(inner, outer, w_star, h)
        >>> float(res.grad)                            # d/dh [|y|^2 / (2 (1 + e^h)^2)] = -5/8
        -0.625
        >>> res.solve.converged, res.inner_residual < 1e-12
        (True, True)

    References:
        J. Lorraine, P. Vicol, D. Duvenaud, "Optimizing Millions of Hyperparameters by
        Implicit Differentiation", AISTATS 2020. A. Rajeswaran, C. Finn, S. Kakade,
        S. Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019.
    """
    options = solve_options(locals())
    w_leaves, w_struct = flatten(params, "params")
    h_leaves, h_struct = flatten(hparams, "hparams")
    for name, t in zip(w_struct.names + h_struct.names, w_leaves + h_leaves, strict=True):
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; implicit gradients need floating tensors")
    refuse_frozen(w_leaves, w_struct.names, "params")
    ws = detached_leaves(w_leaves)
    hs = detached_leaves(h_leaves)
    w_in, h_in = w_struct.unflatten(ws), h_struct.unflatten(hs)
    nw = len(ws)

    with torch.enable_grad():
        with differentiable_attention():  # differentiated twice: no fused attention kernel
            L_in = _scalar(inner_loss(w_in, h_in), "inner_loss")
        # only the w-gradient gets a graph (as a hand-written loop would); whether each
        # hyperparameter is in the graph of inner_loss is checked at the mixed product
        g_w = torch.autograd.grad(L_in, ws, create_graph=True, allow_unused=True)
        for name, g in zip(w_struct.names, g_w, strict=True):
            if g is None:
                raise ValueError(
                    f"{name} is not in the graph of inner_loss: the inner loss does not "
                    "depend on it (or it was detached); remove it from params"
                )
        g_in = parameters_to_vector([g.detach() for g in g_w])
        inner_residual = float(torch.linalg.vector_norm(g_in))

        L_out = _scalar(outer_loss(w_in, h_in), "outer_loss")
        if not L_out.requires_grad:
            raise ValueError("outer_loss depends neither on params nor on hparams (no graph)")
        raw = torch.autograd.grad(L_out, ws + hs, allow_unused=True)
        out = [torch.zeros_like(t) if g is None else g for t, g in zip(ws + hs, raw, strict=True)]
        gw_out, gh_out = out[:nw], out[nw:]
        b = check_finite(parameters_to_vector(gw_out), "the gradient of outer_loss")

        matvec = hessian_matvec(g_w, ws)  # one backward through the gradient graph per product
        info: dict[str, Any] = {"params_norm": float(torch.linalg.vector_norm(_vector(ws)))}
        if warn and inner_tol is not None:
            # relative test on the Newton step (the estimated distance to the optimum), not
            # on the gradient, whose size scales with the loss
            info["newton_step"] = newton_step(matvec, g_in, damping=damping, maxiter=maxiter)
            warn_if_unsolved(
                info["newton_step"],
                info["params_norm"],
                inner_residual,
                inner_tol,
                what="the inner problem is not solved",
                matrix="(H + damping I)",
                residual_name="grad_w inner_loss",
                consequence="the hypergradient",
            )

        x0_flat = None
        if x0 is not None:
            x0_leaves, _ = flatten(x0, "x0")
            x0_flat = parameters_to_vector([t.detach() for t in x0_leaves]).to(b.dtype)
        res = solve_symmetric(matvec, b, **options, x0=x0_flat)
        v = res.x if isinstance(res.x, Tensor) else parameters_to_vector(res.x)
        vs = vector_to_parameters(v.detach(), ws)
        res.x = w_struct.unflatten([t.clone() for t in vs])

        live = [i for i, g in enumerate(g_w) if g.requires_grad]
        cross: list[Tensor | None] = [None] * len(hs)
        if live:
            cross = list(
                torch.autograd.grad(
                    [g_w[i] for i in live],
                    hs,
                    [vs[i] for i in live],
                    allow_unused=True,
                    retain_graph=True,  # inner_loss's graph may be needed just below
                )
            )
        missing = [i for i, c in enumerate(cross) if c is None]
        if missing:  # no mixed derivative: legitimate only if inner_loss uses h at all
            reach = torch.autograd.grad(
                L_in, [hs[i] for i in missing], allow_unused=True, retain_graph=True
            )
            for i, r in zip(missing, reach, strict=True):
                if r is None:
                    raise ValueError(
                        f"{h_struct.names[i]} is not in the graph of inner_loss: the inner "
                        "problem does not depend on this hyperparameter (or it was detached "
                        "inside inner_loss), so its implicit gradient is undefined; pass "
                        "hyperparameters that inner_loss uses, with their graph"
                    )
    grad = []
    for gh, c in zip(gh_out, cross, strict=True):
        grad.append(gh.clone() if c is None else gh - c)
    for name, g in zip(h_struct.names, grad, strict=True):
        check_finite(g, f"the hypergradient {name}")
    return HypergradientResult(
        grad=h_struct.unflatten(grad),
        solve=res,
        inner_residual=inner_residual,
        outer_loss=float(L_out.detach()),
        inner_loss=float(L_in.detach()),
        direct=h_struct.unflatten([g.detach() for g in gh_out]),
        info=info,
    )


def _vector(ts: list[Tensor]) -> Tensor:
    return parameters_to_vector([t.detach() for t in ts])


def _scalar(loss: Any, what: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(f"{what} must return a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"{what} must return a scalar, got shape {tuple(loss.shape)}")
    return loss.reshape(())
