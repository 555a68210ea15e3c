"""Hessian / GGN / Fisher operators: products, conversions, algebra, restrict.

The data traversal, the batches' weights and the Fisher's own options are tested in
test_traversal.py, test_weighting.py and test_fisher.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import DTYPES, PRODUCT_TOL
from dense_reference import (
    DEVICES,
    N_DATA,
    REDUCTIONS,
    SPLIT,
    assert_close,
    make_problem,
    ref_empirical_fisher,
    ref_ggn,
    ref_gradient,
    ref_hessian,
    split_batches,
    two_batch_problem,
)
from second import (
    DampedOperator,
    DenseOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    ScaledOperator,
    SumOperator,
)

PROBLEMS = [("mlp_tanh", "mse"), ("mlp_sigmoid", "ce"), ("cnn", "bce"), ("cnn", "ce")]
KINDS = {
    "hessian": (HessianOperator, {}, lambda m, lf, X, y, red: ref_hessian(m, lf, X, y)),
    "ggn": (GGNOperator, {}, lambda m, lf, X, y, red: ref_ggn(m, lf, X, y)),
    "ef": (
        FisherOperator,
        {"fisher": "empirical"},
        lambda m, lf, X, y, red: ref_empirical_fisher(m, lf, X, y, red),
    ),
}
CASES = list(itertools.product(PROBLEMS, REDUCTIONS, KINDS))
CASE_IDS = [f"{m}-{lo}-{r}-{k}" for (m, lo), r, k in CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_products_match_dense_reference(case, dtype, device):
    (model_name, loss_name), reduction, kind = case
    cls, kw, reference = KINDS[kind]
    model64, X64, y64, loss_fn, model, X, y = make_problem(
        model_name, loss_name, reduction, dtype, device=device
    )
    A = reference(model64, loss_fn, X64, y64, reduction)
    tol = PRODUCT_TOL[dtype]
    n = A.shape[0]
    v = torch.randn(n, dtype=torch.float64)
    V = torch.randn(n, 3, dtype=torch.float64)
    vd, Vd = v.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)
    for columns in ("loop", "vmap"):
        op = cls(model, loss_fn, (X, y), columns=columns, **kw)
        assert op.shape == (n, n) and op.dtype == dtype and op.device.type == device
        assert op.reduction == reduction
        out = op @ vd
        assert out.shape == (n,) and out.dtype == dtype and out.device.type == device
        assert_close(out, A @ v, tol)
        assert_close(op.matvec(vd), A @ v, tol)
        assert_close(op @ Vd, A @ V, tol)
        assert op.matvecs == 2 + 3
        assert_close(op.to_dense(), A, tol)
        assert_close(op.to_dense(chunk_size=4), A, tol)
        assert (op @ Vd[:, :0]).shape == (n, 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("cache_graphs", [False, True])
def test_several_batches_give_dataset_product(kind, reduction, cache_graphs):
    cls, kw, reference = KINDS[kind]
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "ce", reduction, torch.float64)
    A = reference(model64, loss_fn, X, y, reduction)  # one batch of all N_DATA examples
    tol = PRODUCT_TOL[torch.float64]
    v = torch.randn(A.shape[0], dtype=torch.float64)
    V = torch.randn(A.shape[0], 2, dtype=torch.float64)
    one = cls(model64, loss_fn, (X, y), **kw)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=False)  # 4 + 4 + 2
    for data in (split_batches(X, y, SPLIT), loader):
        op = cls(model64, loss_fn, data, cache_graphs=cache_graphs, **kw)
        for _ in range(2):  # a second pass over the same data is accepted
            assert_close(op @ v, A @ v, tol)
        assert_close(op @ V, A @ V, tol)
        assert_close(op @ v, one @ v, tol)
        assert op.num_data == N_DATA


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_gradient_matches_autograd(reduction, dtype):
    model64, X64, y64, loss_fn, model, X, y = make_problem("cnn", "ce", reduction, dtype)
    expected_loss = loss_fn(model64(X64), y64)
    expected_grad = ref_gradient(model64, loss_fn, X64, y64)
    tol = PRODUCT_TOL[dtype]
    for data in ((X, y), split_batches(X, y, SPLIT)):
        op = GGNOperator(model, loss_fn, data)
        loss, g = op.loss_and_gradient()
        assert loss.dim() == 0 and not loss.requires_grad and not g.requires_grad
        assert_close(loss, expected_loss, tol)
        assert_close(g, expected_grad, tol)
        assert_close(op.gradient(), expected_grad, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_scipy(dtype):
    model64, X64, y64, loss_fn, model, X, y = make_problem("mlp_sigmoid", "bce", "mean", dtype)
    H = ref_hessian(model64, loss_fn, X64, y64).numpy()
    sp = HessianOperator(model, loss_fn, (X, y)).to_scipy()
    n = H.shape[0]
    assert sp.shape == (n, n) and sp.dtype == np.dtype(str(dtype).replace("torch.", ""))
    rng = np.random.default_rng(0)
    x, Xm = rng.standard_normal(n), rng.standard_normal((n, 4))
    rtol = PRODUCT_TOL[dtype]["rtol"]
    atol = PRODUCT_TOL[dtype]["atol"] * max(1.0, np.abs(H).max())
    np.testing.assert_allclose(sp.matvec(x), H @ x, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(sp.rmatvec(x), H @ x, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(sp.matmat(Xm), H @ Xm, rtol=rtol, atol=atol * 10)
    np.testing.assert_allclose(sp @ x, H @ x, rtol=rtol, atol=atol * 10)
    # float64 scipy view of a float32 operator, as scipy's solvers prefer
    sp64 = HessianOperator(model, loss_fn, (X, y)).to_scipy(dtype=np.float64)
    assert sp64.matvec(x).dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_algebra(dtype):
    model64, X64, y64, loss_fn, model, X, y = make_problem("mlp_tanh", "ce", "mean", dtype)
    Hd = ref_hessian(model64, loss_fn, X64, y64)
    Gd = ref_ggn(model64, loss_fn, X64, y64)
    H = HessianOperator(model, loss_fn, (X, y))
    G = GGNOperator(model, loss_fn, (X, y))
    n = Hd.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    tol = PRODUCT_TOL[dtype]
    cases = {
        "sum": (H + G, Hd + Gd),
        "difference": (H - G, Hd - Gd),
        "scaled": (2.5 * H, 2.5 * Hd),
        "right-scaled": (H * 0.5, 0.5 * Hd),
        "tensor-scaled": (H * torch.tensor(3.0), 3 * Hd),
        "divided": (H / 4, Hd / 4),
        "negated": (-H, -Hd),
        "damped": (H.damped(0.3), Hd + 0.3 * eye),
        "damped twice": (G.damped(0.1).damped(0.2), Gd + 0.3 * eye),
        "sum with identity": (G + 0.7 * IdentityOperator(n, dtype, "cpu"), Gd + 0.7 * eye),
        "dense plus operator": (DenseOperator(Gd.to(dtype)) + H, Gd + Hd),
    }
    v = torch.randn(n, 2, dtype=torch.float64)
    for name, (op, dense) in cases.items():
        assert op.shape == (n, n) and op.dtype == dtype, name
        assert_close(op @ v.to(dtype), dense @ v, tol, msg=name)
        assert_close(op @ v[:, 0].to(dtype), dense @ v[:, 0], tol, msg=name)
        assert_close(op.to_dense(), dense, tol, msg=name)
    assert isinstance(H + G, SumOperator) and isinstance(2 * H, ScaledOperator)
    damped = G.damped(0.1).damped(0.2)
    assert isinstance(damped, DampedOperator) and damped.damping == pytest.approx(0.3)
    # what is known about definiteness is tracked through the algebra
    assert G.psd and G.damped(0.1).psd and (G + G).psd and (2 * G).psd
    assert not H.psd and not (-G).psd and not (H + G).psd
    assert all(op.symmetric for op in (H, G, H + G, H.damped(1.0)))


def test_algebra_rejects_mismatched_operators():
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", "mean", torch.float64)
    H = HessianOperator(model64, loss_fn, (X, y))
    with pytest.raises(ValueError, match="cannot add"):
        H + IdentityOperator(H.shape[0] + 1, torch.float64, "cpu")
    with pytest.raises(ValueError, match="cannot add"):
        H + IdentityOperator(H.shape[0], torch.float32, "cpu")
    with pytest.raises(ValueError, match="damping"):
        H.damped(float("nan"))
    assert H.__add__(3) is NotImplemented
    with pytest.raises(TypeError):
        H * "two"


def test_explicit_params_subset_and_reduction_override():
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", "mean", torch.float64)
    full = ref_hessian(model64, loss_fn, X, y)
    last = list(model64.parameters())[2:]
    k = sum(p.numel() for p in last)
    H = HessianOperator(model64, loss_fn, (X, y), params=last)
    assert H.shape == (k, k)
    assert_close(H.to_dense(), full[-k:, -k:], PRODUCT_TOL[torch.float64])
    # a plain function as the loss: the reduction is given explicitly

    def summed(out, target):
        return ((out - target) ** 2).sum()

    Hs = HessianOperator(model64, summed, split_batches(X, y, SPLIT), reduction="sum")
    assert_close(Hs.to_dense(), ref_hessian(model64, summed, X, y), PRODUCT_TOL[torch.float64])
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model64, summed, (X, y), reduction="max")
    with pytest.raises(ValueError, match="columns"):
        HessianOperator(model64, summed, (X, y), columns="parallel")


def test_tuple_inputs_and_repr():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x1, x2):
            return torch.tanh(self.a(x1)) + self.b(x2)

    torch.manual_seed(0)
    model = TwoInputs().double()
    x1, x2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    H = HessianOperator(model, loss_fn, ((x1, x2), y))
    params = list(model.parameters())
    loss = loss_fn(model(x1, x2), y)
    from second import exact_hessian

    assert_close(H.to_dense(), exact_hessian(loss, params), PRODUCT_TOL[torch.float64])
    assert "HessianOperator" in repr(H) and str(H.shape) in repr(H)


# ----------------------------------------------------------------------------- restrict
TOL = PRODUCT_TOL[torch.float64]


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_restrict_is_the_operator_on_that_batch(cls):
    model, loss_fn, X, y, batches = two_batch_problem()
    op = cls(model, loss_fn, batches, columns="loop", cache_graphs=True)
    sub = op.restrict(batches[1])
    assert type(sub) is cls and sub.single_batch
    assert (sub.columns, sub.cache_graphs, sub.reduction) == ("loop", True, "mean")
    assert sub.distributed is False
    assert_close(sub.to_dense(), cls(model, loss_fn, batches[1]).to_dense(), TOL)
    # the restriction on one batch differs from the dataset operator (not a vacuous check)
    assert not torch.allclose(sub.to_dense(), op.to_dense())


def test_restrict_keeps_the_ggn_equal_to_the_reference():
    model, loss_fn, X, y, batches = two_batch_problem()
    sub = GGNOperator(model, loss_fn, batches).restrict(batches[0])
    assert_close(sub.to_dense(), ref_ggn(model, loss_fn, *batches[0]), TOL)


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator])
def test_restrict_with_parameters_given_as_a_generator(cls):
    """Regression: the recorded generator was consumed: "no parameters given"."""
    model, loss_fn, X, y, batches = two_batch_problem()
    op = cls(model, loss_fn, batches, model.parameters())
    expected = cls(model, loss_fn, batches[1]).to_dense()
    assert_close(op.restrict(batches[1]).to_dense(), expected, TOL)
    last = list(model.parameters())[2:]
    op = cls(model, loss_fn, batches, params=(p for p in last))
    expected = cls(model, loss_fn, batches[0], params=last).to_dense()
    assert_close(op.restrict(batches[0]).to_dense(), expected, TOL)


# Tolerance: a float16 product against the float32 one on the same data (float16 rounding
# of the inputs, parameters and the result: eps 1e-3).
HALF_RTOL = 5e-3


def _half_twins(d_in: int, d_out: int, batch: int):
    """A float32 ``nn.Linear`` and its float16 copy, with 80,000 examples in batches of both."""
    torch.manual_seed(0)
    X, y = torch.randn(80_000, d_in), torch.randn(80_000, d_out)
    m32 = nn.Linear(d_in, d_out)
    m16 = nn.Linear(d_in, d_out).half()
    m16.load_state_dict({k: t.half() for k, t in m32.state_dict().items()})
    data32 = list(zip(X.split(batch), y.split(batch), strict=True))
    return m32, m16, data32, [(a.half(), b.half()) for a, b in data32]


def test_float16_products_over_many_examples_are_accumulated_in_float32():
    """Regression: the weighted sum W_b (A_b v) in float16 overflowed past 65504 examples."""
    m32, m16, data32, data16 = _half_twins(3, 2, 10_000)
    v = torch.ones(8)
    want = GGNOperator(m32, nn.MSELoss(), data32) @ v
    got = GGNOperator(m16, nn.MSELoss(), data16) @ v.half()
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, rtol=HALF_RTOL, atol=0.0)


def test_float16_loss_and_gradient_over_many_examples_are_accumulated_in_float32():
    """Regression: loss_and_gradient summed W_b * loss_b in float16 (inf past 65504)."""
    m32, m16, data32, data16 = _half_twins(2, 1, 40_000)
    want_loss, want_grad = GGNOperator(m32, nn.MSELoss(), data32).loss_and_gradient()
    loss, grad = GGNOperator(m16, nn.MSELoss(), data16).loss_and_gradient()
    assert loss.dtype == grad.dtype == torch.float16
    torch.testing.assert_close(loss.float(), want_loss, rtol=HALF_RTOL, atol=0.0)
    torch.testing.assert_close(grad.float(), want_grad, rtol=HALF_RTOL, atol=1e-3)
