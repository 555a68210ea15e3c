"""second.solvers: lissa against dense float64 solves, over mini-batches and single operators."""

from __future__ import annotations

import pytest
import torch

import second
from second import ConvergenceWarning, lissa, relative_error
from second._errors import SecondDeprecationWarning
from spectra import LISSA_RELERR, rhs, sym_matrix


def test_lissa_stochastic_batches():
    g = torch.Generator().manual_seed(3)
    n, k = 20, 4
    base = [torch.randn(n, 8, generator=g, dtype=torch.float64) for _ in range(k)]
    batches = [B @ B.T / 8 for B in base]
    A = sum(batches) / k
    lam = 0.5
    b = rhs(n)
    x_ref = torch.linalg.solve(A + lam * torch.eye(n, dtype=A.dtype), b)
    res = lissa(batches, b, damping=lam, repeats=100, tol=1e-6, full_operator=A)
    assert res.converged and res.info["predicted_bias"] <= 1e-6
    assert relative_error(res.x, x_ref) < LISSA_RELERR


def test_lissa_warns_about_truncation_bias():
    A = sym_matrix(torch.logspace(-2, 1, 20).tolist())
    with pytest.warns(ConvergenceWarning, match="truncation bias"):
        res = lissa([A], rhs(20), depth=10)
    assert not res.converged and res.info["predicted_bias"] > 0.5


# ------------------------------------------------------------------ LiSSA over several batches
# Regression: LiSSA drew the batches of a CurvatureOperator uniformly and used each batch's own
# mean (or sum) curvature, so it estimated (mean_b A_b + lambda I)^-1 b: 40% off for batches of
# 2 and 10 examples, 3x off for a sum over 3 batches, with converged=True.
LISSA_BATCHES_RELERR = 5e-2  # stochastic (seeded): 200 repeats; the old bias was 0.3 to 1.2
LISSA_BATCHES_REPEATS = 200


def _lissa_vs_dense(loss_fn, model, X, y, batches, damping):
    from dense_reference import ref_hessian

    H = second.HessianOperator(model, loss_fn, batches)
    H_ref = ref_hessian(model, loss_fn, X, y)  # the loss on all the data at once
    b = rhs(H.shape[0])  # not ones: that is a null vector of a softmax's Hessian
    x_ref = torch.linalg.solve(H_ref + damping * torch.eye(H.shape[0], dtype=H_ref.dtype), b)
    g = torch.Generator().manual_seed(0)
    res = lissa(
        H, b, damping=damping, tol=1e-3, repeats=LISSA_BATCHES_REPEATS, generator=g,
        progressbar=False,
    )  # fmt: skip
    assert res.converged
    return relative_error(res.x, x_ref)


def _regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    X[:2] *= 2.0  # the small batch has the larger curvature
    y = torch.randn(12, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 1, bias=False).double()
    return model, X, y


def test_lissa_weighs_unequal_batches_of_a_mean_by_their_share():
    model, X, y = _regression_data()
    batches = [(X[:2], y[:2]), (X[2:], y[2:])]
    err = _lissa_vs_dense(torch.nn.MSELoss(), model, X, y, batches, damping=1.0)
    assert err < LISSA_BATCHES_RELERR


def test_lissa_sums_the_batches_of_a_sum_reduction():
    model, X, y = _regression_data()
    batches = [(X[:4], y[:4]), (X[4:8], y[4:8]), (X[8:], y[8:])]
    loss = torch.nn.MSELoss(reduction="sum")
    err = _lissa_vs_dense(loss, model, X, y, batches, damping=5.0)
    assert err < LISSA_BATCHES_RELERR


def test_lissa_weighs_batches_by_their_valid_targets_and_skips_ignored_ones():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    y[:3] = -100  # the first batch is all ignored: it weighs 0
    y[3:5] = -100  # the second has 2 valid targets of 4, the third 5 of 5
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 3).double()
    batches = [(X[:3], y[:3]), (X[3:7], y[3:7]), (X[7:], y[7:])]
    err = _lissa_vs_dense(torch.nn.CrossEntropyLoss(), model, X, y, batches, damping=0.2)
    assert err < LISSA_BATCHES_RELERR


def test_lissa_batch_sampling_is_unbiased_at_depth_one():
    """One term: x = (2 b - (C A_i + lambda) b / s) / s, so E[x] pins E[C A_i] = A exactly."""
    from dense_reference import ref_hessian

    model, X, y = _regression_data()
    loss = torch.nn.MSELoss(reduction="sum")
    batches = [(X[:2], y[:2]), (X[2:5], y[2:5]), (X[5:], y[5:])]
    H = second.HessianOperator(model, loss, batches)
    b = torch.ones(3, dtype=torch.float64)
    s = 100.0
    res = lissa(H, b, depth=1, scale=s, repeats=3000, generator=torch.Generator().manual_seed(0),
                progressbar=False, warn=False)  # fmt: skip
    Ab = s * (2 * b - s * res.x)  # the sampled curvature's mean, applied to b
    assert relative_error(Ab, ref_hessian(model, loss, X, y) @ b) < LISSA_BATCHES_RELERR


# ------------------------------------------------------------------ LiSSA: scale, warnings
def test_lissa_refuses_a_scale_below_half_lambda_max():
    """Regression: q >= 1 gave depth -4 and x = b / s, no warning (or an unguarded blow-up)."""
    A = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = torch.ones(3, dtype=torch.float64)
    for scale, depth in [(1.0, None), (1.9, 50)]:
        with pytest.warns(ConvergenceWarning, match="lambda_max / 2"):
            res = lissa([A], b, scale=scale, depth=depth, tol=1e-2, progressbar=False)
        assert res.diverged and not res.converged
        assert res.info["contraction"] >= 1


def test_lissa_guards_against_a_batch_above_twice_the_scale():
    """A batch curvature of 10 with scale 3 (the full operator's 1.05 lambda_max ~ 2.6)."""
    ops = [
        torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64)),
        torch.eye(2, dtype=torch.float64),
    ]
    full = sum(ops) / 2
    with pytest.warns(ConvergenceWarning, match="recursion diverged"):
        res = lissa(ops, torch.ones(2, dtype=torch.float64), scale=3.0, depth=400,
                    full_operator=full, progressbar=False)  # fmt: skip
    assert res.diverged and not res.converged


def test_lissa_warns_whenever_not_converged():
    """Regression: tol < predicted bias <= bias_warning gave converged=False silently."""
    A = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    with pytest.warns(ConvergenceWarning, match="> tol"):
        res = lissa([A], torch.ones(2, dtype=torch.float64), depth=8, tol=1e-3, progressbar=False)
    assert not res.converged and 1e-3 < res.info["predicted_bias"] < 0.05


def test_lissa_function_of_batches_gets_indices_in_range():
    ops = [torch.eye(2, dtype=torch.float64), 3 * torch.eye(2, dtype=torch.float64)]
    seen = []

    def batch(i):
        seen.append(i)
        return ops[i]

    res = lissa(batch, torch.ones(2, dtype=torch.float64), num_batches=2, tol=1e-6, repeats=50,
                full_operator=sum(ops) / 2, progressbar=False, warn=False)  # fmt: skip
    assert set(seen) == {0, 1}
    assert relative_error(res.x, torch.full((2,), 0.5, dtype=torch.float64)) < LISSA_BATCHES_RELERR
    # without num_batches the indices are seeds: a function that indexes a list says why it fails
    with pytest.raises(ValueError, match="num_batches"):
        lissa(lambda i: ops[i], torch.ones(2, dtype=torch.float64), progressbar=False)


def test_lissa_counts_the_products_lanczos_made():
    """Regression: n = 6 < lanczos_steps = 20 reported 20 set-up products for 6."""
    A = sym_matrix(torch.linspace(1, 3, 6).tolist())
    calls = []

    def mv(v):
        calls.append(1)
        return A @ v

    op = second.CallableOperator(mv, 6, torch.float64)
    res = lissa(op, rhs(6), tol=1e-3, progressbar=False)
    assert res.matvecs == len(calls)


def test_lissa_recursion_products_is_matvecs():
    A = sym_matrix(torch.linspace(1, 2, 4).tolist())
    rec = second.solvers.lissa_recursion(rhs(4), lambda p: A @ p, depth=30, scale=2.5)
    assert rec.matvecs == 30
    with pytest.warns(SecondDeprecationWarning, match=r"LissaRecursion\.products.*\.matvecs"):
        assert rec.products == rec.matvecs
