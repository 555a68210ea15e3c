r"""``implicit_root``: give any inner solver implicit gradients through ordinary autograd."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from torch import Tensor

from ..func.attention import differentiable_attention
from ..func.products import check_finite, grad_checked
from ..func.vectors import parameters_to_vector, vector_to_parameters
from ..solvers import SolveResult
from ._linear import solve_options, solve_symmetric
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

    for every tensor argument :math:`a` that requires grad. All tensors of
    :math:`w^*` (a tuple or dict of several parameters) form one vector, so the
    solve uses the full Jacobian, off-diagonal blocks included. Each product with
    :math:`(\partial F/\partial w)^\top` is one backward pass through the graph of
    :math:`F`, built once per backward.

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
        warn: warn about unconverged solves and negative curvature.

    Returns:
        A decorator: ``implicit_root(F)(solver)`` has ``solver``'s signature. Its
        ``last_solve`` attribute holds the :class:`~second.SolveResult` of the most
        recent backward.

    Raises:
        TypeError: the solver returns something other than a tensor, a tuple/list or a
            dict of floating tensors.
        ValueError: (in backward) ``optimality_fn`` returns a different layout from the
            solver's output.

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
            arg_leaves, rebuild = _flatten_args(args)
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
        w_saved, diff_saved = saved[:n_w], saved[n_w:]
        opts = spec.options
        with torch.enable_grad():
            ws = detached_leaves(w_saved)
            hs = detached_leaves(diff_saved)
            leaves = list(spec.arg_leaves)
            for i, h in zip(spec.diff, hs, strict=True):
                leaves[i] = h
            args = spec.rebuild(leaves)
            with differentiable_attention():  # differentiated twice: no fused attention kernel
                F = spec.optimality_fn(spec.w_struct.unflatten(ws), *args)
            F_leaves, _ = flatten(F, "optimality_fn's output")
            shapes_ok = len(F_leaves) == n_w and all(
                f.shape == w.shape for f, w in zip(F_leaves, ws, strict=True)
            )
            if not shapes_ok:
                raise ValueError(
                    "optimality_fn must return tensors laid out like the solver's output "
                    f"(shapes {[tuple(w.shape) for w in ws]}), got "
                    f"{[tuple(f.shape) for f in F_leaves]}"
                )
            live = [i for i, f in enumerate(F_leaves) if f.requires_grad]
            b = parameters_to_vector(zeros_for_none(ws, w_bar))

            def vjp_w(u: Tensor) -> Tensor:
                us = vector_to_parameters(u, ws)
                if not live:
                    return torch.zeros_like(u)
                F_live, u_live = [F_leaves[i] for i in live], [us[i] for i in live]
                out = grad_checked(F_live, ws, u_live, retain_graph=True, zeros_for_unused=True)
                return parameters_to_vector(out)

            if spec.symmetric:
                res = solve_symmetric(
                    vjp_w, b, **opts, what="the Jacobian of optimality_fn", stacklevel=6
                )
                u = res.x if isinstance(res.x, Tensor) else parameters_to_vector(res.x)
            else:
                res = None
                n = b.numel()
                eye = torch.eye(n, dtype=b.dtype, device=b.device)
                JT = torch.stack([vjp_w(eye[:, j]) for j in range(n)], dim=1)  # J^T columns
                JT = JT + opts["damping"] * eye
                u = torch.linalg.solve(JT, b)
            spec.owner.last_solve = res
            us = vector_to_parameters(u.detach(), ws)
            if live:
                grads = torch.autograd.grad(
                    [F_leaves[i] for i in live], hs, [us[i] for i in live], allow_unused=True
                )
            else:
                grads = [None] * len(hs)
        out = []
        for _h, g, need in zip(hs, grads, ctx.needs_input_grad[1 + n_w :], strict=True):
            if g is None or not need:
                out.append(None)
            else:
                out.append(-check_finite(g, "the implicit gradient"))
        return (None, *([None] * n_w), *out)


def _flatten_args(args: tuple) -> tuple[list[Any], Callable[[list[Any]], tuple]]:
    """Flatten positional args one level (tensors, tuples/lists and dicts of tensors)."""
    leaves: list[Any] = []
    layout: list[tuple[int, Callable[[list[Any]], Any]]] = []  # (leaves, rebuild from them)
    for a in args:
        if isinstance(a, dict):
            layout.append((len(a), functools.partial(_dict_of, list(a.keys()))))
            leaves.extend(a.values())
        elif isinstance(a, (tuple, list)):
            layout.append((len(a), type(a)))
            leaves.extend(a)
        else:
            layout.append((1, _only))
            leaves.append(a)

    def rebuild(new_leaves: list[Any]) -> tuple:
        out, k = [], 0
        for size, build in layout:
            out.append(build(new_leaves[k : k + size]))
            k += size
        return tuple(out)

    return leaves, rebuild


def _dict_of(keys: list[Any], values: list[Any]) -> dict[Any, Any]:
    return dict(zip(keys, values, strict=True))


def _only(values: list[Any]) -> Any:
    return values[0]
