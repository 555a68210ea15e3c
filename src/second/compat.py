"""The seed notebook's functional API, as thin entry points over the real solvers.

``conjugate_gradient``, ``neumann`` (seed form), ``fixed_point`` and
``clip_grad_norm`` keep the seed module's call signatures so the notebook runs
unchanged, but they are safe: they stop at convergence, detect negative
curvature and divergence, and warn instead of returning garbage silently.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._deprecation import warn_deprecated
from ._errors import ConvergenceWarning, NegativeCurvatureWarning
from .func.vectors import parameters_to_vector
from .solvers import cg, minres, neumann_solve

__all__ = ["conjugate_gradient", "neumann", "fixed_point", "clip_grad_norm"]


def _flat(vector) -> Tensor:
    return vector if isinstance(vector, Tensor) else parameters_to_vector(vector)


def _matvec(mvp: Callable) -> Callable[[Tensor], Tensor]:
    def f(v: Tensor) -> Tensor:
        out = mvp(v)
        return out if isinstance(out, Tensor) else parameters_to_vector(out)

    return f


def conjugate_gradient(
    mvp: Callable[[Tensor], Tensor],
    vector: Tensor | Sequence[Tensor],
    parameters: Sequence[Tensor] | None = None,
    cg_iter: int = 10,
    eps: float = 0.0,
    *,
    tol: float = 1e-10,
    fallback: str | None = "minres",
) -> Tensor:
    r"""Approximate :math:`A^{-1} v` by conjugate gradient (the seed's signature).

    Runs :func:`second.cg` for at most ``cg_iter`` iterations from zero, stopping early at
    relative residual ``tol``. CG is only valid for positive-definite ``A``: when it meets
    non-positive curvature (a Hessian away from a minimum, as in the seed notebook) it
    warns and, with ``fallback="minres"`` (default), solves with :func:`second.minres`
    instead (up to ``max(cg_iter, 4 n)`` iterations, recurrences in float64 for lower
    precisions), which handles indefinite systems.
    With ``fallback=None`` it returns CG's last iterate.

    Args:
        mvp: the matrix-vector product, e.g. ``lambda v: hvp(loss, params, v)``.
        vector: the right-hand side (flat or parameter-shaped).
        parameters: unused; kept for the seed's signature.
        cg_iter: maximum number of CG iterations.
        eps: added to the denominators' safety margin in the seed; here a Tikhonov damping
            ``(A + eps I)`` (0 by default, as in the seed).
        tol: relative residual at which to stop.
        fallback: ``"minres"`` or ``None``.

    Returns:
        The flat solution vector.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
        >>> x = conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> torch.allclose(A @ x, torch.tensor([1.0, 2.0], dtype=torch.float64))
        True
    """
    del parameters
    b = _flat(vector).detach()
    f = _matvec(mvp)
    res = cg(f, b, maxiter=cg_iter, tol=tol, damping=eps, warn=False)
    if res.negative_curvature and fallback == "minres":
        warnings.warn(
            "conjugate_gradient: the matrix is not positive definite (p^T A p <= 0); "
            "solving with MINRES instead",
            NegativeCurvatureWarning,
            stacklevel=2,
        )
        # low precision loses the Lanczos vectors' orthogonality within a few dozen steps on
        # the seed's Hessian (condition ~1e4-1e5): run the recurrences in float64 there
        hi = torch.float64 if b.dtype != torch.float64 and b.device.type != "mps" else None
        res = minres(
            f, b, maxiter=max(cg_iter, 4 * b.numel()), tol=tol, damping=eps, recurrence_dtype=hi
        )
    elif not res.converged:
        warnings.warn(f"conjugate_gradient: {res.message}", _warning_for(res), stacklevel=2)
    assert isinstance(res.x, Tensor)  # b is flat, so is x
    return res.x


def _warning_for(res):
    return NegativeCurvatureWarning if res.negative_curvature else ConvergenceWarning


def neumann(A, *args, **kwargs):
    r"""Neumann-series inverse in the seed's form: ``neumann(mvp, parameters, vector, truncate_iter=10)``.

    The solver with a :class:`~second.SolveResult` is :func:`second.neumann_solve`; calling
    this function in that form (``neumann(A, b, *, scale=None, ...)``) still works but is
    deprecated (removed in 0.3).

    The seed form (recognized by a ``parameters`` sequence before ``vector``, or the
    ``vector``/``truncate_iter`` keywords) returns the flat scaled sum
    :math:`\frac1s \sum_{i=0}^{K} (I - A/s)^i v`, an approximation of :math:`A^{-1} v`,
    with ``K = truncate_iter`` and ``s = scale`` (default 1, the seed's, where it is the
    seed's plain sum). It stops early once the relative residual is below ``1e-12``. A
    series that goes wrong returns the best partial sum seen and warns, saying why:
    negative curvature detected (an indefinite matrix, as the seed notebook's Hessian:
    :class:`~second.NegativeCurvatureWarning`; no scale helps), contraction > 1
    (:math:`\lambda_{\max} > 2s`: the scale is too small) or a residual that grows
    (:class:`~second.ConvergenceWarning`). A series still converging after ``K`` terms is
    the truncation asked for: it does not warn.

    Example:
        >>> A = torch.diag(torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
        >>> p = [torch.zeros(3, requires_grad=True)]
        >>> x = neumann(lambda v: A @ v, p, vector=torch.ones(3, dtype=torch.float64),
        ...             truncate_iter=60)                    # seed form: scale 1
        >>> torch.allclose(x, torch.tensor([2.0, 1.0, 2 / 3], dtype=torch.float64))
        True
    """
    seed_call = (
        "truncate_iter" in kwargs
        or "vector" in kwargs
        or "parameters" in kwargs
        or (len(args) >= 2 and _is_param_seq(args[0]))
    )
    if not seed_call:
        warn_deprecated(
            "second.neumann(A, b, ...) in the solver form",
            "second.neumann_solve(A, b, ...)",
            detail="it returns the same SolveResult; second.neumann keeps the seed's form "
            "neumann(mvp, parameters, vector, truncate_iter)",
        )
        return neumann_solve(A, *args, **kwargs)
    names = ["parameters", "vector", "truncate_iter"]
    bound = dict(zip(names, args))
    overlap = set(bound) & set(kwargs)
    if overlap:
        raise TypeError(f"neumann() got multiple values for {sorted(overlap)}")
    bound.update(kwargs)
    vector = bound.pop("vector", None)
    if vector is None:
        raise TypeError("neumann() seed form needs a vector")
    truncate_iter = int(bound.pop("truncate_iter", 10))
    bound.pop("parameters", None)
    scale = bound.pop("scale", 1.0)
    if bound:
        raise TypeError(f"neumann() got unexpected arguments {sorted(bound)}")
    b = _flat(vector).detach()
    res = neumann_solve(_matvec(A), b, scale=scale, maxiter=truncate_iter, tol=1e-12, warn=False)
    if _went_wrong(res):
        warnings.warn(f"neumann: {res.message}", _warning_for(res), stacklevel=2)
    return res.x


def _went_wrong(res) -> bool:
    """A truncated series gone wrong: diverging, a growing residual or negative curvature.

    The seed forms truncate the series on purpose (``truncate_iter``, ``num_iter``): a
    series still converging when it stops is what was asked for, and does not warn.
    """
    info = res.info
    return not res.converged and bool(
        res.diverged or info.get("warn_negative") or info.get("growing")
    )


def _is_param_seq(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def fixed_point(
    mvp: Callable[[Tensor], Tensor],
    vector: Tensor | Sequence[Tensor],
    num_iter: int = 20,
    lr: float = 1.0,
) -> Tensor:
    r"""Richardson fixed-point iteration for :math:`A^{-1} v` (the seed's signature).

    Iterates :math:`u_{k+1} = u_k - \mathrm{lr}\, A u_k + v` from :math:`u_0 = v` and returns
    :math:`\mathrm{lr}\, u_K`, which tends to :math:`A^{-1}v` when :math:`0 < \mathrm{lr} <
    2/\lambda_{\max}` and ``A`` is positive definite: a Neumann series with scale ``1/lr``.
    It stops early once converged (relative residual ``1e-12``); a series that goes wrong
    warns and says why, as :func:`neumann`'s seed form (negative curvature detected, ``lr``
    too large, a growing residual), returning the best iterate seen; one still converging
    when ``num_iter`` ends is the truncation asked for and does not warn.

    Example:
        >>> A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
        >>> fixed_point(lambda v: A @ v, torch.ones(2, dtype=torch.float64), num_iter=100, lr=0.5)
        tensor([1.0000, 0.5000], dtype=torch.float64)
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    b = _flat(vector).detach()
    res = neumann_solve(_matvec(mvp), b, scale=1.0 / lr, maxiter=num_iter, tol=1e-12, warn=False)
    if _went_wrong(res):
        warnings.warn(f"fixed_point: {res.message}", _warning_for(res), stacklevel=2)
    assert isinstance(res.x, Tensor)  # b is flat, so is x
    return res.x


def clip_grad_norm(
    gradients: Sequence[Tensor], max_norm: float, norm_type: float = 2.0
) -> tuple[list[Tensor], Tensor]:
    """Scale gradients so their joint ``norm_type``-norm is at most ``max_norm`` (seed API).

    Unlike :func:`torch.nn.utils.clip_grad_norm_` it returns new tensors (differentiable)
    rather than modifying ``.grad`` in place.

    Returns:
        ``(clipped_gradients, total_norm)``.

    Raises:
        ValueError: for ``max_norm <= 0`` or an empty list.
        NonFiniteError: when the total norm is NaN or Inf.

    Example:
        >>> g, n = clip_grad_norm([torch.tensor([3.0, 4.0])], max_norm=1.0)
        >>> n
        tensor(5.)
        >>> torch.allclose(g[0], torch.tensor([0.6, 0.8]))
        True
    """
    from .func.products import check_finite

    gradients = list(gradients)
    if not gradients:
        raise ValueError("clip_grad_norm got no gradients")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm_type = float(norm_type)
    if norm_type == float("inf"):
        total = torch.stack([g.detach().abs().max() for g in gradients]).max()
    else:
        total = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.detach(), norm_type) for g in gradients]),
            norm_type,
        )
    check_finite(total, "gradient norm")
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1:
        gradients = [g * coef for g in gradients]
    return gradients, total
