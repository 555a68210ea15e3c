r"""``implicit_root``: give any inner solver implicit gradients through ordinary autograd."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..func.attention import differentiable_attention
from ..func.dense import dense_from_matmat
from ..func.products import check_finite, grad_checked
from ..func.vectors import (
    columns_to_parameters,
    parameters_to_columns,
    parameters_to_vector,
    vector_to_parameters,
)
from ..solvers import SolveResult
from ._linear import (
    newton_step,
    solve_options,
    solve_symmetric,
    warn_if_unsolved,
)
from ._structure import detached_leaves, flatten, zeros_for_none

__all__ = ["implicit_root", "stationary"]


class ImplicitSolver(Protocol):
    """What :func:`implicit_root` returns: the solver, and the last backward solve's result."""

    last_solve: SolveResult | None

    def __call__(self, *args: Any) -> Any: ...


def stationary(inner_loss: Callable[..., Tensor]) -> Callable[..., Any]:
    r"""Build the optimality condition :math:`\nabla_w L(w, \ldots) = 0` of a minimization.

    Args:
        inner_loss: ``inner_loss(params, *args) -> scalar``.

    Returns:
        ``optimality_fn(params, *args)``, the gradient of ``inner_loss`` in ``params``
        (with its graph), laid out like ``params``; for :func:`implicit_root`.

    Example:
        >>> F = stationary(lambda w, h: 0.5 * ((w - h) ** 2).sum())
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> F(w, torch.tensor([1.0, 0.0])).detach()
        tensor([0., 2.])
    """

    @functools.wraps(inner_loss)
    def optimality_fn(params, *args):
        leaves, struct = flatten(params, "params")
        with torch.enable_grad():
            loss = inner_loss(params, *args)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        grads = zeros_for_none(leaves, grads)
        return struct.unflatten(grads)

    return optimality_fn


def implicit_root(
    optimality_fn: Callable[..., Any],
    *,
    method: str = "auto",
    tol: float | None = None,
    atol: float = 0.0,
    maxiter: int | None = None,
    damping: float = 0.0,
    symmetric: bool = True,
    inner_tol: float | None = 1e-4,
    warn: bool = True,
) -> Callable[[Callable[..., Any]], ImplicitSolver]:
    r"""Decorate an inner solver so autograd differentiates its output implicitly.

    ``solver(*args)`` returns :math:`w^*` with :math:`F(w^*, \text{args}) = 0`, where
    :math:`F` is ``optimality_fn`` (for a minimization, the gradient of the inner loss:
    see :func:`stationary`). The decorated solver runs ``solver`` on detached
    arguments (its iterations never enter the graph, so memory does not grow with
    them; it may use autograd internally) and returns :math:`w^*` as the
    output of a :class:`torch.autograd.Function` whose backward applies the implicit
    function theorem: for an incoming cotangent :math:`\bar w`,

    .. math::

        \Big(\frac{\partial F}{\partial w}\Big)^{\!\top} u = \bar w, \qquad
        \bar a = -\Big(\frac{\partial F}{\partial a}\Big)^{\!\top} u

    for every tensor :math:`a` that requires grad among the arguments, at any depth of
    nesting in tuples, lists and dicts (``solver(s, {"reg": (a, l)})``: tensors held
    by other objects are constants). All tensors of :math:`w^*` (a tuple or dict of
    several parameters) form one vector, so the solve uses the full Jacobian,
    off-diagonal blocks included. Each product with :math:`(\partial F/\partial w)^\top`
    is one backward pass through the graph of :math:`F`, built once per backward.

    Second derivatives: under ``create_graph=True`` the gradient is itself
    differentiable (Hessians, Hessian-vector products, meta-gradients through the
    solver): :math:`w^*` is followed through its own implicit rule, and :math:`u` as
    the implicit function of :math:`(w^*, \text{args}, \bar w)` that solves the system
    above, so differentiating it costs one more solve with
    :math:`\partial F/\partial w` and needs the third derivatives of the inner loss
    (for :func:`stationary`).

    With ``symmetric=True`` (default: :math:`F` is a gradient, so its Jacobian is a
    Hessian) the solve is CG with a MINRES fallback on negative curvature
    (``method="auto"``) or the named method of :func:`second.solve`. With
    ``symmetric=False`` (a general root or fixed-point residual) the Jacobian is
    formed densely (one product per parameter) and solved by LU; that is meant for
    small problems.

    Args:
        optimality_fn: ``F(params, *args)``, laid out like the solver's output,
            zero at the solution.
        method: ``"auto"``, ``"cg"``, ``"minres"``, ``"dense"`` or ``"neumann"``.
        tol: relative residual tolerance (default ``1e-10`` in float64, ``1e-5`` in float32).
        atol: absolute residual tolerance.
        maxiter: iteration limit of the solve.
        damping: :math:`\lambda \ge 0` added to :math:`\partial F/\partial w`.
        symmetric: whether :math:`\partial F/\partial w` is symmetric (default ``True``).
        inner_tol: relative accuracy the solver's output must have, as in
            :func:`second.hypergradient`: the backward warns
            (:class:`~second.ConvergenceWarning`) when the Newton step
            :math:`\delta = (\partial F/\partial w + \lambda I)^{-1} F(w)`, the estimated
            distance to the root, has :math:`\|\delta\| > \mathrm{inner\_tol}\,\|w\|`; away
            from a root the implicit gradient is wrong to first order in :math:`\delta`.
            The step is one more solve (to relative residual ``1e-2``) with
            ``symmetric=True``, and free with ``symmetric=False`` (the Jacobian is formed);
            none is run when :math:`F(w) = 0`. ``None`` (or ``warn=False``) skips the check.
        warn: warn about unconverged solves, negative curvature and an output that is not
            a root (``inner_tol``).

    Returns:
        A decorator: ``implicit_root(F)(solver)`` has ``solver``'s signature. Its
        ``last_solve`` attribute holds the :class:`~second.SolveResult` of the most
        recent backward.

    Raises:
        TypeError: the solver returns something other than a tensor, a tuple/list or a
            dict of floating tensors.
        ValueError: ``damping`` is negative or not finite; (in backward)
            ``optimality_fn`` returns a different layout from the solver's output.

    Example:
        >>> A = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> inner = lambda w, h: 0.5 * w @ A @ w - h @ w        # w* = A^-1 h
        >>> @implicit_root(stationary(inner))
        ... def solve_inner(h):
        ...     return torch.linalg.solve(A, h)
        >>> h = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
        >>> solve_inner(h).sum().backward()                      # dw*/dh = A^-1
        >>> torch.allclose(h.grad, torch.linalg.solve(A, torch.ones(2, dtype=torch.float64)))
        True
    """
    options = solve_options(locals())

    def decorator(solver: Callable[..., Any]) -> ImplicitSolver:
        @functools.wraps(solver)
        def wrapped(*args):
            arg_leaves, tree = tree_flatten(args)  # nested tuples, lists, dicts: every tensor
            rebuild = functools.partial(_rebuild, tree)
            diff = [
                i for i, a in enumerate(arg_leaves) if isinstance(a, Tensor) and a.requires_grad
            ]
            # the solver sees detached arguments: its iterations are never part of the graph
            plain = [a.detach() if isinstance(a, Tensor) else a for a in arg_leaves]
            out = solver(*rebuild(plain))
            w_leaves, w_struct = flatten(out, "the solver's output")
            for name, w in zip(w_struct.names, w_leaves, strict=True):
                if not w.is_floating_point():
                    raise TypeError(
                        f"{name} has dtype {w.dtype}: implicit_root needs floating tensors"
                    )
            w_leaves = [w.detach() for w in w_leaves]
            if not diff or not torch.is_grad_enabled():
                return w_struct.unflatten(w_leaves)
            spec = _Spec(optimality_fn, rebuild, arg_leaves, diff, w_struct, wrapped)
            spec.options, spec.symmetric, spec.n_w = options, symmetric, len(w_leaves)
            spec.inner_tol = inner_tol
            outs = _ImplicitRoot.apply(spec, *w_leaves, *[arg_leaves[i] for i in diff])
            return w_struct.unflatten(list(outs))

        implicit = cast(ImplicitSolver, wrapped)  # a function with a last_solve attribute
        implicit.last_solve = None
        return implicit

    return decorator


@dataclass
class _Spec:
    """What the backward of one :func:`implicit_root` call needs."""

    optimality_fn: Callable[..., Any]
    rebuild: Callable[[list], tuple]
    arg_leaves: list
    diff: list[int]  # the arguments' leaves that require a gradient
    w_struct: Any  # the layout of the solver's output
    owner: Any  # the decorated solver (its last_solve attribute is set)
    options: dict = field(default_factory=dict)  # solve_options
    symmetric: bool = True
    n_w: int = 0  # the number of output leaves
    inner_tol: float | None = None  # the root check of the backward (None: none)


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *tensors):
        ctx.spec = spec
        ctx.save_for_backward(*tensors)
        n_w = spec.n_w
        outs = tuple(t.clone() for t in tensors[:n_w])
        return outs

    @staticmethod
    def backward(ctx, *w_bar):
        spec = ctx.spec
        n_w = spec.n_w
        saved = ctx.saved_tensors
        w_saved, h_saved = list(saved[:n_w]), list(saved[n_w:])
        w_bar_full = zeros_for_none(w_saved, w_bar)
        if torch.is_grad_enabled():  # create_graph=True: the gradient must have a graph too
            grads = _gradient_with_graph(spec, w_saved, h_saved, w_bar_full)
        else:
            grads = _gradient(spec, w_saved, h_saved, w_bar_full)
        out = []
        for g, need in zip(grads, ctx.needs_input_grad[1 + n_w :], strict=True):
            if g is None or not need:
                out.append(None)
            else:
                out.append(-check_finite(g, "the implicit gradient"))
        return (None, *([None] * n_w), *out)


def _evaluate(spec: _Spec, ws: list[Tensor], hs: list[Tensor]) -> list[Tensor]:
    """``optimality_fn`` at ``ws`` with ``hs`` in place of the differentiable arguments."""
    leaves = list(spec.arg_leaves)
    for i, h in zip(spec.diff, hs, strict=True):
        leaves[i] = h
    args = spec.rebuild(leaves)
    with differentiable_attention():  # differentiated twice: no fused attention kernel
        F = spec.optimality_fn(spec.w_struct.unflatten(ws), *args)
    F_leaves, _ = flatten(F, "optimality_fn's output")
    shapes_ok = len(F_leaves) == len(ws) and all(
        f.shape == w.shape for f, w in zip(F_leaves, ws, strict=True)
    )
    if not shapes_ok:
        raise ValueError(
            "optimality_fn must return tensors laid out like the solver's output "
            f"(shapes {[tuple(w.shape) for w in ws]}), got "
            f"{[tuple(f.shape) for f in F_leaves]}"
        )
    return F_leaves


def _adjoint_solve(
    spec: _Spec, ws: list[Tensor], hs: list[Tensor], w_bar: list[Tensor]
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    r"""Solve :math:`(\partial F/\partial w + \lambda I)^\top u = \bar w` at fresh leaves.

    Returns ``u`` (laid out like ``ws``, detached), :math:`F`'s leaves (with their graph)
    and the indices of those that depend on anything. Checks first that ``ws`` is a root
    (``inner_tol``), and sets the owner's ``last_solve``.
    """
    opts = spec.options
    F_leaves = _evaluate(spec, ws, hs)
    live = [i for i, f in enumerate(F_leaves) if f.requires_grad]
    b = parameters_to_vector([t.detach() for t in w_bar])

    def vjp_w(u: Tensor, batched: bool = False) -> Tensor:
        """(dF/dw)^T u; ``batched``: on the k columns of a [P, k] ``u``, one vmap-batched pass."""
        if not live:
            return torch.zeros_like(u)
        us = columns_to_parameters(u, ws) if batched else vector_to_parameters(u, ws)
        F_live, u_live = [F_leaves[i] for i in live], [us[i] for i in live]
        out = grad_checked(
            F_live, ws, u_live, retain_graph=True, zeros_for_unused=True, is_grads_batched=batched
        )
        return parameters_to_columns(out) if batched else parameters_to_vector(out)

    check = opts["warn"] and spec.inner_tol is not None
    f = parameters_to_vector([t.detach() for t in F_leaves])
    step = 0.0
    res: SolveResult | None
    if spec.symmetric:
        if check:  # the Jacobian is symmetric: J^T's products are J's
            step = newton_step(vjp_w, f, damping=opts["damping"], maxiter=opts["maxiter"])
        res = solve_symmetric(vjp_w, b, **opts, what="the Jacobian of optimality_fn")
        u = res.x if isinstance(res.x, Tensor) else parameters_to_vector(res.x)
    else:
        res = None
        n = b.numel()
        eye = torch.eye(n, dtype=b.dtype, device=b.device)
        JT = dense_from_matmat(
            functools.partial(vjp_w, batched=True), vjp_w, n, dtype=b.dtype, device=b.device
        )
        JT = JT + opts["damping"] * eye
        if check and bool(f.any()):
            step = float(torch.linalg.vector_norm(torch.linalg.solve(JT.mT, f.to(JT.dtype))))
        u = torch.linalg.solve(JT, b)
    if check:
        warn_if_unsolved(
            step,
            float(torch.linalg.vector_norm(parameters_to_vector([w.detach() for w in ws]))),
            float(torch.linalg.vector_norm(f)),
            cast(float, spec.inner_tol),
            what="implicit_root: the solver's output is not a root of optimality_fn",
            matrix="(dF/dw + damping I)",
            residual_name="F(w)",
            consequence="the implicit gradient",
        )
    spec.owner.last_solve = res
    return list(vector_to_parameters(u.detach(), ws)), F_leaves, live


def _gradient(
    spec: _Spec, w_saved: list[Tensor], h_saved: list[Tensor], w_bar: list[Tensor]
) -> list[Tensor | None]:
    r""":math:`(\partial F/\partial a)^\top u` for each differentiable argument, no graph."""
    with torch.enable_grad():
        ws = detached_leaves(w_saved)
        hs = detached_leaves(h_saved)
        us, F_leaves, live = _adjoint_solve(spec, ws, hs, w_bar)
        if not live:
            return [None] * len(hs)
        return list(
            torch.autograd.grad(
                [F_leaves[i] for i in live], hs, [us[i] for i in live], allow_unused=True
            )
        )


def _gradient_with_graph(
    spec: _Spec, w_saved: list[Tensor], h_saved: list[Tensor], w_bar: list[Tensor]
) -> list[Tensor | None]:
    r"""The same product, differentiable in the arguments and the cotangent.

    Every quantity it depends on gets its own graph: :math:`w^*` by this Function again
    (the implicit rule), :math:`u` by the implicit function of
    :math:`G(u; w, a, \bar w) = (\partial F/\partial w + \lambda I)^\top u - \bar w`
    (:func:`_adjoint_root`), and the partial derivative in :math:`a` is taken at an alias
    of :math:`a`, so that its path through :math:`w^*(a)` is not followed here, only when
    this gradient is differentiated.
    """
    w = list(_ImplicitRoot.apply(spec, *[t.detach() for t in w_saved], *h_saved))
    u = _adjoint_root(spec)(tuple(w), tuple(h_saved), tuple(w_bar))
    h_alias = [h.view_as(h) for h in h_saved]
    return _vjp_with_graph(_evaluate(spec, w, h_alias), h_alias, u)


def _vjp_with_graph(
    F_leaves: list[Tensor], inputs: list[Tensor], u: Sequence[Tensor]
) -> list[Tensor | None]:
    r""":math:`(\partial F/\partial\,\mathrm{inputs})^\top u` with its graph (``None``: no path)."""
    live = [i for i, f in enumerate(F_leaves) if f.requires_grad]
    if not live:
        return [None] * len(inputs)
    return list(
        torch.autograd.grad(
            [F_leaves[i] for i in live],
            inputs,
            [u[i] for i in live],
            create_graph=True,
            allow_unused=True,
        )
    )


def _adjoint_root(spec: _Spec) -> ImplicitSolver:
    r"""``(w, args, w_bar) -> u``, the solution of the backward's system, as an implicit root.

    Its optimality condition :math:`G = (\partial F/\partial w)^\top u + \lambda u - \bar w`
    carries the damping (so the root's own damping is 0); its Jacobian in :math:`u` is
    :math:`(\partial F/\partial w + \lambda I)^\top`, symmetric when
    :math:`\partial F/\partial w` is. A third derivative recurses the same way.
    """
    damping = spec.options["damping"]

    Leaves = tuple[Tensor, ...]

    def G(u: Leaves, w: Leaves, hs: Leaves, w_bar: Leaves) -> Leaves:
        w_in = [t if t.requires_grad else t.detach().requires_grad_(True) for t in w]
        jtu_full = zeros_for_none(w_in, _vjp_with_graph(_evaluate(spec, w_in, list(hs)), w_in, u))
        return tuple(j + damping * x - b for j, x, b in zip(jtu_full, u, w_bar, strict=True))

    def solve_u(w: Leaves, hs: Leaves, w_bar: Leaves) -> Leaves:
        with torch.enable_grad():
            us, _, _ = _adjoint_solve(spec, detached_leaves(w), detached_leaves(hs), list(w_bar))
        return tuple(us)

    options = dict(spec.options, damping=0.0)
    return implicit_root(G, **options, symmetric=spec.symmetric, inner_tol=None)(solve_u)


def _rebuild(tree: TreeSpec, leaves: list[Any]) -> tuple:
    return tuple(tree_unflatten(list(leaves), tree))
