"""Influence.newton_loo: one Newton step on each leave-one-out objective (see its docstring)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .._errors import ConvergenceWarning, NegativeCurvatureWarning
from ..func.dense import dense_from_matmat
from ..func.per_example import ModelFunction, check_rows_finite
from ..solvers import solve
from ._cache import fingerprint
from ._inverse import DenseInverse

if TYPE_CHECKING:
    from ._influence import Influence

__all__ = ["newton_loo"]


def newton_loo(inf: Influence, test_data, train_indices: Sequence[int] | Tensor) -> Tensor:
    """:meth:`Influence.newton_loo` for ``inf`` (the documentation is there)."""
    inf._check_model()
    idx = [
        int(i)
        for i in (train_indices.tolist() if isinstance(train_indices, Tensor) else train_indices)
    ]
    for i in idx:
        if not 0 <= i < inf.n_train:
            raise IndexError(f"training index {i} is outside [0, {inf.n_train})")
    test = inf._test(test_data)
    inf._same_on_all_ranks("test data", test.digest(inf.batch_size))
    inf._same_on_all_ranks("training indices", fingerprint(idx))
    tests = test.take(range(test.n))
    Gt = torch.stack([inf.fn.gradients(one, measure=True)[0] for one in tests])
    check_rows_finite(Gt, "test example")
    out = torch.zeros(test.n, len(idx), dtype=inf.fn.dtype, device=inf.fn.device)
    if not idx:
        return out
    kind = {"hessian": "hessian", "fisher": "fisher"}.get(inf.curvature, "ggn")
    P, w = inf.fn.numel, inf.weight
    examples = inf.train.take(idx)
    deltas = torch.zeros(P, len(idx), dtype=inf.fn.dtype, device=inf.fn.device)
    inv = inf.inverse
    fallback: list[int] = []
    with inf._collective("newton_loo"):
        for pos in inf._bar(range(len(idx)), len(idx), "newton-loo"):
            if not inf._mine(pos):
                continue
            one = examples[pos]
            g = inf.fn.gradients(one)[0]
            check_rows_finite(g[None], "training example", idx[pos])
            b = w * g
            if isinstance(inv, DenseInverse):
                Hj = _dense_example_curvature(inf.fn, one, kind)
                M = inv.matrix - w * Hj
                L, info = torch.linalg.cholesky_ex(M)
                if int(info) == 0:
                    d = torch.cholesky_solve(b.to(torch.float64)[:, None], L)[:, 0]
                else:
                    d = None
            else:
                d = _loo_iterative(inf, inv, one, b, kind)
            if d is None:
                # the leave-one-out curvature is not positive definite: a Newton step along
                # its negative direction would overshoot arbitrarily; keep the first order
                fallback.append(idx[pos])
                d = inv(b[:, None])[:, 0]
            deltas[:, pos] = d.to(deltas)
    if fallback:
        warnings.warn(
            f"newton_loo: the leave-one-out curvature of training point(s) {fallback[:10]} is "
            "not positive definite (the model is not at a strict minimum without them); "
            "their estimate uses the first-order step instead of the Newton step",
            NegativeCurvatureWarning,
            stacklevel=3,
        )
    deltas = inf._gather(deltas)
    for i, one in enumerate(tests):
        HD = inf.fn.hessian_products(one, deltas, "hessian", measure=True)
        out[i] = Gt[i] @ deltas + 0.5 * (deltas * HD).sum(0)
    return out


def _loo_iterative(inf: Influence, inv, one, b: Tensor, kind: str) -> Tensor | None:
    """The leave-one-out Newton step by CG/MINRES; ``None`` when it meets negative curvature."""
    op, shift, w = inf.operator, inf.shift, inf.weight

    def matvec(v: Tensor) -> Tensor:
        return op @ v + shift * v - w * inf.fn.hessian_products(one, v, kind)

    x0 = inv(b[:, None])[:, 0]
    M = (lambda v: inv(v[:, None])[:, 0]) if inv.explicit else None
    method = "minres" if inf.curvature == "hessian" else "cg"
    res = solve(matvec, b, method, tol=inf.tol, x0=x0, M=M, maxiter=inf.maxiter, warn=False)
    if res.negative_curvature:
        return None  # not positive definite: the caller falls back to first order
    if not res.converged:
        warnings.warn(f"newton_loo: {res.message}", ConvergenceWarning, stacklevel=4)
    return res.x


def _dense_example_curvature(fn: ModelFunction, one, kind: str) -> Tensor:
    """One example's curvature (a batch of one), dense in float64 and symmetrized."""
    H = dense_from_matmat(
        lambda E: fn.hessian_products(one, E, kind),
        None,
        fn.numel,
        dtype=fn.dtype,
        device=fn.device,
        chunk_size=256,
    ).to(torch.float64)
    return 0.5 * (H + H.T)
