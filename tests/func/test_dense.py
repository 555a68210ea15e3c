"""exact_hessian / exact_ggn / exact_fisher and the Fisher operators against torch.func."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import DTYPES, PRODUCT_TOL
from dense_reference import (
    CASE_IDS,
    CASES,
    LOSSES,
    REDUCTIONS,
    assert_close,
    cast,
    make_data,
    make_loss,
    make_model,
    ref_empirical_fisher,
    ref_ggn,
    ref_hessian,
    ref_per_example_gradients,
)
from second import FisherOperator, GGNOperator, exact_fisher, exact_ggn, exact_hessian
from second._losses import per_sample_losses
from second.func import dense_from_matmat, eigenvalue_cutoff
from second.solvers import dense

# Monte-Carlo Fisher vs GGN: relative Frobenius error allowed with many samples.
# The estimator's standard error falls like 1/sqrt(samples * examples); with
# 2000 samples on 6 examples it is ~1-3% on these problems, so 0.15 is a generous
# bound that a wrong scale (a factor 2, a missing 1/C) cannot pass.
MC_FISHER_REL_ERR = 0.15
MC_SAMPLES_FEW, MC_SAMPLES_MANY = 4, 2000


def _problem(model_name, loss_name, reduction, dtype):
    torch.manual_seed(1)
    model64 = make_model(model_name)
    X64, y64 = make_data(model_name, loss_name)
    loss_fn = make_loss(loss_name, reduction)
    model, X, y = cast(model64, X64, y64, dtype)
    return model64, X64, y64, loss_fn, model, X, y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_exact_hessian_and_ggn(case, dtype):
    model64, X64, y64, loss_fn, model, X, y = _problem(*case, dtype)
    params = tuple(model.parameters())
    out = model(X)
    loss = loss_fn(out, y)
    H = exact_hessian(loss, params)
    assert H.dtype == dtype and H.shape == (sum(p.numel() for p in params),) * 2
    assert_close(H, ref_hessian(model64, loss_fn, X64, y64), PRODUCT_TOL[dtype])
    # chunked assembly gives the same matrix
    assert_close(exact_hessian(loss, params, chunk_size=7), H, PRODUCT_TOL[dtype])
    G = exact_ggn(loss, out, params, chunk_size=None)
    assert_close(G, ref_ggn(model64, loss_fn, X64, y64), PRODUCT_TOL[dtype])
    # the GGN of a convex loss is symmetric positive semi-definite
    assert_close(G, G.T, PRODUCT_TOL[dtype])
    G64 = G.double()
    assert torch.linalg.eigvalsh(G64).min() > -1e-6 * max(1.0, float(G64.abs().max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_exact_fisher_is_per_example_gradient_outer_product(case, dtype):
    model64, X64, y64, loss_fn, model, X, y = _problem(*case, dtype)
    reduction = case[2]
    params = tuple(model.parameters())
    losses = per_sample_losses(loss_fn, model(X), y, reduction)
    F = exact_fisher(losses, params, reduction=reduction)
    assert_close(F, ref_empirical_fisher(model64, loss_fn, X64, y64, reduction), PRODUCT_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ggn_equals_hessian_for_linear_model_with_mse(reduction, dtype):
    # f = W x + b is linear in the parameters, so the second term of the Hessian vanishes
    torch.manual_seed(0)
    model64 = make_model("linear")
    X64, y64 = make_data("linear", "mse")
    loss_fn = make_loss("mse", reduction)
    model, X, y = cast(model64, X64, y64, dtype)
    params = tuple(model.parameters())
    out = model(X)
    loss = loss_fn(out, y)
    H, G = exact_hessian(loss, params), exact_ggn(loss, out, params)
    assert_close(G, H, PRODUCT_TOL[dtype])
    op = GGNOperator(model, loss_fn, (X, y))
    assert_close(op.to_dense(), H, PRODUCT_TOL[dtype])


@pytest.mark.parametrize("loss_name", LOSSES)
def test_mc_fisher_tends_to_ggn(loss_name):
    model64, X64, y64, loss_fn, *_ = _problem("mlp_tanh", loss_name, "mean", torch.float64)
    G = ref_ggn(model64, loss_fn, X64, y64)

    def rel_err(samples):
        F = FisherOperator(
            model64,
            loss_fn,
            (X64, y64),
            fisher="mc",
            mc_samples=samples,
            generator=torch.Generator().manual_seed(123),
        ).to_dense()
        return float(torch.linalg.matrix_norm(F - G) / torch.linalg.matrix_norm(G))

    few, many = rel_err(MC_SAMPLES_FEW), rel_err(MC_SAMPLES_MANY)
    assert many < MC_FISHER_REL_ERR, (few, many)
    # ~sqrt(500) = 22x less noise; ask for a factor 3 only
    assert many < few / 3, (few, many)


def test_mc_fisher_sum_reduction_scale():
    # the MC Fisher of a sum-reduced loss is N times the mean-reduced one (same samples)
    model64, X64, y64, *_ = _problem("mlp_tanh", "ce", "mean", torch.float64)
    Fs = {}
    for red in REDUCTIONS:
        Fs[red] = FisherOperator(
            model64,
            make_loss("ce", red),
            (X64, y64),
            fisher="mc",
            mc_samples=3,
            generator=torch.Generator().manual_seed(5),
        ).to_dense()
    assert_close(Fs["sum"], X64.shape[0] * Fs["mean"], PRODUCT_TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_empirical_fisher_operator(case, dtype):
    model64, X64, y64, loss_fn, model, X, y = _problem(*case, dtype)
    op = FisherOperator(model, loss_fn, (X, y), fisher="empirical")
    expected = ref_empirical_fisher(model64, loss_fn, X64, y64, case[2])
    assert_close(op.to_dense(), expected, PRODUCT_TOL[dtype])
    # and the per-example-gradient formula, spelled out
    Gi = ref_per_example_gradients(model64, loss_fn, X64, y64)
    v = torch.randn(Gi.shape[1], dtype=torch.float64)
    w = 1.0 / X64.shape[0] if case[2] == "mean" else 1.0
    assert_close(op @ v.to(dtype), w * Gi.T @ (Gi @ v), PRODUCT_TOL[dtype])


def test_exact_fisher_rejects_bad_input():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="per-example"):
        exact_fisher((w * 2).sum(), [w])
    with pytest.raises(ValueError, match="reduction"):
        exact_fisher(w * 2, [w], reduction="max")


class _SpatialNet(nn.Module):
    """Per-pixel logits ``[n, 3, 2, 2]``: cross-entropy over dimension 1 at 4 positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 2)

    def forward(self, x):
        return self.conv(torch.tanh(x))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_spatial_cross_entropy(reduction):
    torch.manual_seed(3)
    model = _SpatialNet().double()
    X = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5, 2, 2))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    G = ref_ggn(model, loss_fn, X, y)
    tol = PRODUCT_TOL[torch.float64]
    assert_close(GGNOperator(model, loss_fn, (X, y)).to_dense(), G, tol)
    ef = FisherOperator(model, loss_fn, (X, y), fisher="empirical").to_dense()
    assert_close(ef, ref_empirical_fisher(model, loss_fn, X, y, reduction), tol)
    mc = FisherOperator(
        model,
        loss_fn,
        (X, y),
        fisher="mc",
        mc_samples=MC_SAMPLES_MANY,
        generator=torch.Generator().manual_seed(0),
    ).to_dense()
    assert float(torch.linalg.matrix_norm(mc - G) / torch.linalg.matrix_norm(G)) < MC_FISHER_REL_ERR


def test_gvp_of_loss_linear_in_output_is_zero():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    f = w * 3.0
    G = exact_ggn(f.sum(), f, [w])
    torch.testing.assert_close(G, torch.zeros(2, 2, dtype=torch.float64))


def test_dense_assembly_falls_back_to_columns_when_batching_fails():
    from second.func.dense import dense_from_matmat

    A = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)

    def matmat(E):
        raise RuntimeError("vmap: this operator has no batching rule")

    with pytest.warns(UserWarning, match="column by column"):
        D = dense_from_matmat(matmat, lambda e: A @ e, 3, dtype=A.dtype, device=A.device)
    torch.testing.assert_close(D, A)

    def broken(E):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        dense_from_matmat(broken, lambda e: A @ e, 3, dtype=A.dtype, device=A.device)
    # chunked batched assembly
    D = dense_from_matmat(lambda E: A @ E, None, 3, dtype=A.dtype, device=A.device, chunk_size=2)
    torch.testing.assert_close(D, A)


# ----------------------------------------------------------------------------- eigenvalue_cutoff, rectangular assembly
EPS64 = torch.finfo(torch.float64).eps
EPS32 = torch.finfo(torch.float32).eps


def test_cutoff_follows_the_glossary_rule():
    lam = torch.tensor([4.0, -2.0, 1e-20], dtype=torch.float64)
    assert eigenvalue_cutoff(lam) == pytest.approx(3 * EPS64 * 4.0)
    # a matrix computed in float32 carries float32 rounding, whatever the eigh dtype
    assert eigenvalue_cutoff(lam, dtype=torch.float32) == pytest.approx(EPS32 * 4.0)
    # n large enough that n eps(float64) exceeds eps(float32)
    n = 2 * int(EPS32 / EPS64)
    assert eigenvalue_cutoff(lam, n=n, dtype=torch.float32) == pytest.approx(n * EPS64 * 4.0)
    assert eigenvalue_cutoff(lam, rcond=0.1) == pytest.approx(0.4)
    assert eigenvalue_cutoff(torch.zeros(0)) == 0.0
    assert eigenvalue_cutoff(lam.to(torch.complex128)) == pytest.approx(3 * EPS64 * 4.0)
    with pytest.raises(ValueError, match="rcond"):
        eigenvalue_cutoff(lam, rcond=-1.0)


def test_dense_solver_uses_the_shared_cutoff():
    """A singular PSD matrix: the dense solve is the pseudo-inverse with the shared cutoff."""
    U = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64)).Q
    lam = torch.tensor([3.0, 2.0, 1.0, 1e-3, 1e-17, 0.0], dtype=torch.float64)
    A = U @ torch.diag(lam) @ U.T
    b = U[:, :4] @ torch.ones(4, dtype=torch.float64)  # in the range
    res = dense(A, b, tol=1e-8)
    keep = lam.abs() > eigenvalue_cutoff(torch.linalg.eigvalsh(A))
    assert int(keep.sum()) == 4 == res.info["rank"]
    pinv = U @ torch.diag(torch.where(keep, 1.0 / lam, torch.zeros_like(lam))) @ U.T
    torch.testing.assert_close(res.x, pinv @ b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 5])
def test_dense_from_matmat_assembles_rectangular_matrices(chunk_size):
    A = torch.randn(3, 5, dtype=torch.float64)
    got = dense_from_matmat(
        lambda E: A @ E,
        lambda e: A @ e,
        (3, 5),
        dtype=A.dtype,
        device=A.device,
        chunk_size=chunk_size,
    )
    torch.testing.assert_close(got, A, rtol=0, atol=0)
    S = A @ A.T
    square = dense_from_matmat(lambda E: S @ E, None, 3, dtype=S.dtype, device=S.device)
    torch.testing.assert_close(square, S, rtol=0, atol=0)


def test_dense_from_matmat_falls_back_to_columns_when_batching_fails():
    A = torch.randn(2, 3, dtype=torch.float64)

    def matmat(E):
        raise RuntimeError("vmap: batching rule not implemented")

    with pytest.warns(UserWarning, match="column by column"):
        got = dense_from_matmat(matmat, lambda e: A @ e, (2, 3), dtype=A.dtype, device=A.device)
    torch.testing.assert_close(got, A, rtol=0, atol=0)
