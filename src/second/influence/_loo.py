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
from ._examples import zero_rows
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
    unweighted = inf._test_zero_rows(test, 0, test.n)  # test examples of weight zero: 0
    Gt = zero_rows(Gt, unweighted)
    check_rows_finite(Gt, "test example")
    out = torch.zeros(test.n, len(idx), dtype=inf.fn.dtype, device=inf.fn.device)
    if not idx:
        return out
    curvature = _example_curvature(inf)
    P = inf.fn.numel
    examples = inf.train.take(idx)
    deltas = torch.zeros(P, len(idx), dtype=inf.fn.dtype, device=inf.fn.device)
    inv = inf.inverse
    fallback: list[int] = []
    with inf._collective("newton_loo"):
        for pos in inf._bar(range(len(idx)), len(idx), "newton-loo"):
            if not inf._mine(pos):
                continue
            one = examples[pos]
            # example j's share of the objective (w_j = W_j / W for a mean); weight 0: no change
            w = inf.weight if inf.weight is not None else float(inf.weights[idx[pos]])
            if w == 0:
                continue
            g = inf.fn.gradients(one)[0]
            check_rows_finite(g[None], "training example", idx[pos])
            b = w * g
            # the example's term in the curvature: w_j C_j, linear in the loss, except the
            # empirical Fisher's, quadratic in the weighted gradient: n w_j^2 g_j g_j^T
            cw = w * (inf.n_train * w) if curvature == "fisher" and inf.weight is None else w
            if isinstance(inv, DenseInverse):
                Hj = _dense_example_curvature(inf.fn, one, curvature)
                M = inv.matrix - cw * Hj
                L, info = torch.linalg.cholesky_ex(M)
                if int(info) == 0:
                    d = torch.cholesky_solve(b.to(torch.float64)[:, None], L)[:, 0]
                else:
                    d = None
            else:
                d = _loo_iterative(inf, inv, one, b, curvature, cw)
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
        if unweighted is not None and bool(unweighted[i]):
            continue
        HD = inf.fn.hessian_products(one, deltas, curvature="hessian", measure=True)
        out[i] = Gt[i] @ deltas + 0.5 * (deltas * HD).sum(0)
    return out


def _example_curvature(inf: Influence) -> str:
    """What one example's term of the curvature is: its Hessian, empirical Fisher or GGN.

    The empirical Fisher's term is the outer product of the example's gradient; the GGN's,
    the type-2 Fisher's (which equals it) and the Monte-Carlo Fisher's (whose expectation it
    is) is the example's GGN.
    """
    if inf.curvature == "hessian":
        return "hessian"
    if inf.curvature == "fisher" and inf.operator.fisher == "empirical":
        return "fisher"
    return "ggn"


def _loo_iterative(inf: Influence, inv, one, b: Tensor, curvature: str, w: float) -> Tensor | None:
    """The leave-one-out Newton step by CG/MINRES; ``None`` when it meets negative curvature.

    ``w``: the weight of the example's curvature in the whole one.
    """
    op, shift = inf.operator, inf.shift

    def matvec(v: Tensor) -> Tensor:
        return op @ v + shift * v - w * inf.fn.hessian_products(one, v, curvature=curvature)

    x0 = inv(b[:, None])[:, 0]
    M = (lambda v: inv(v[:, None])[:, 0]) if inv.explicit else None
    method = "minres" if inf.curvature == "hessian" else "cg"
    res = solve(matvec, b, method, tol=inf.tol, x0=x0, M=M, maxiter=inf.maxiter, warn=False)
    if res.negative_curvature:
        return None  # not positive definite: the caller falls back to first order
    if not res.converged:
        warnings.warn(f"newton_loo: {res.message}", ConvergenceWarning, stacklevel=4)
    return res.x


def _dense_example_curvature(fn: ModelFunction, one, curvature: str) -> Tensor:
    """One example's curvature (a batch of one), dense in float64 and symmetrized."""
    H = dense_from_matmat(
        lambda E: fn.hessian_products(one, E, curvature=curvature),
        None,
        fn.numel,
        dtype=fn.dtype,
        device=fn.device,
        chunk_size=256,
    ).to(torch.float64)
    return 0.5 * (H + H.T)
