"""Hessian / GGN / Fisher operators: products, conversions, algebra, data traversal."""

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
    REDUCTIONS,
    assert_close,
    cast,
    make_data,
    make_loss,
    make_model,
    ref_empirical_fisher,
    ref_ggn,
    ref_gradient,
    ref_hessian,
)
from second import (
    DampedOperator,
    DenseOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
    IdentityOperator,
    NonDeterministicDataError,
    ScaledOperator,
    SumOperator,
)
from second.solvers import lissa
from weighted_cases import WEIGHTED_LOSSES, padded_sequences

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

N_DATA = 10
SPLIT = [2, 5, 3]  # unequal batch sizes


def _problem(model_name, loss_name, reduction, dtype, n=N_DATA, device="cpu"):
    torch.manual_seed(1)
    model64 = make_model(model_name)
    X64, y64 = make_data(model_name, loss_name, n)
    loss_fn = make_loss(loss_name, reduction)
    model, X, y = cast(model64, X64, y64, dtype, device)
    return model64, X64, y64, loss_fn, model, X, y


def _split(X, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((X[start : start + s], y[start : start + s]))
        start += s
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_products_match_dense_reference(case, dtype, device):
    (model_name, loss_name), reduction, kind = case
    cls, kw, reference = KINDS[kind]
    model64, X64, y64, loss_fn, model, X, y = _problem(
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
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "ce", reduction, torch.float64)
    A = reference(model64, loss_fn, X, y, reduction)  # one batch of all N_DATA examples
    tol = PRODUCT_TOL[torch.float64]
    v = torch.randn(A.shape[0], dtype=torch.float64)
    V = torch.randn(A.shape[0], 2, dtype=torch.float64)
    one = cls(model64, loss_fn, (X, y), **kw)
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=False)  # 4 + 4 + 2
    for data in (_split(X, y, SPLIT), loader):
        op = cls(model64, loss_fn, data, cache_graphs=cache_graphs, **kw)
        for _ in range(2):  # a second pass over the same data is accepted
            assert_close(op @ v, A @ v, tol)
        assert_close(op @ V, A @ V, tol)
        assert_close(op @ v, one @ v, tol)
        assert op.num_data == N_DATA


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mean_reduction_is_weighted_by_batch_size_not_averaged_per_batch(reduction):
    # the naive average of per-batch Hessians differs from the dataset Hessian when
    # batches have unequal sizes; the operator must give the latter
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", reduction, torch.float64)
    batches = _split(X, y, [1, 9])
    H = HessianOperator(model64, loss_fn, batches).to_dense()
    per_batch = [ref_hessian(model64, loss_fn, Xb, yb) for Xb, yb in batches]
    if reduction == "mean":
        expected = (1 * per_batch[0] + 9 * per_batch[1]) / 10
        naive = (per_batch[0] + per_batch[1]) / 2
        assert not torch.allclose(H, naive)
    else:
        expected = per_batch[0] + per_batch[1]
    assert_close(H, expected, PRODUCT_TOL[torch.float64])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_and_gradient_matches_autograd(reduction, dtype):
    model64, X64, y64, loss_fn, model, X, y = _problem("cnn", "ce", reduction, dtype)
    expected_loss = loss_fn(model64(X64), y64)
    expected_grad = ref_gradient(model64, loss_fn, X64, y64)
    tol = PRODUCT_TOL[dtype]
    for data in ((X, y), _split(X, y, SPLIT)):
        op = GGNOperator(model, loss_fn, data)
        loss, g = op.loss_and_gradient()
        assert loss.dim() == 0 and not loss.requires_grad and not g.requires_grad
        assert_close(loss, expected_loss, tol)
        assert_close(g, expected_grad, tol)
        assert_close(op.gradient(), expected_grad, tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_scipy(dtype):
    model64, X64, y64, loss_fn, model, X, y = _problem("mlp_sigmoid", "bce", "mean", dtype)
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
    model64, X64, y64, loss_fn, model, X, y = _problem("mlp_tanh", "ce", "mean", dtype)
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
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", "mean", torch.float64)
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


def test_shuffling_dataloader_is_detected():
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", "mean", torch.float64)
    loader = DataLoader(TensorDataset(X, y), batch_size=3, shuffle=True)
    op = HessianOperator(model64, loss_fn, loader)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    with pytest.raises(NonDeterministicDataError, match="shuffle"):
        for _ in range(5):  # the first pass records the batches, a later one differs
            op @ v
    # the check can be switched off deliberately
    op = HessianOperator(model64, loss_fn, loader, check_deterministic=False)
    for _ in range(3):
        assert torch.isfinite(op @ v).all()


def test_data_yielding_fewer_batches_on_a_later_pass_is_detected():
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", "mean", torch.float64)
    batches = _split(X, y, SPLIT)

    class Shrinking:
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches if self.passes == 1 else batches[:-1])

    op = GGNOperator(model64, loss_fn, Shrinking())
    v = torch.randn(op.shape[0], dtype=torch.float64)
    op @ v
    with pytest.raises(NonDeterministicDataError, match="batches"):
        op @ v


def test_dropout_in_training_mode_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randn(8, 3)
    for cls in (HessianOperator, GGNOperator, FisherOperator):
        with pytest.raises(NonDeterministicDataError, match="dropout"):
            cls(model, nn.MSELoss(), (X, y))
    model.eval()
    op = HessianOperator(model, nn.MSELoss(), (X, y))
    assert torch.isfinite(op @ torch.ones(op.shape[0])).all()
    # dropout with p=0 is deterministic, and the check can be turned off
    model.train()
    HessianOperator(model, nn.MSELoss(), (X, y), check_deterministic=False)
    model[1].p = 0.0
    HessianOperator(model, nn.MSELoss(), (X, y))


def test_batchnorm_in_training_mode_raises_and_buffers_stay_untouched_in_eval():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(8, 4), torch.randn(8, 3)
    with pytest.raises(NonDeterministicDataError, match="running statistics"):
        GGNOperator(model, nn.MSELoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    model.eval()
    before = model[1].running_mean.clone()
    op = GGNOperator(model, nn.MSELoss(), [(X[:4], y[:4]), (X[4:], y[4:])])
    op @ torch.ones(op.shape[0])
    op @ torch.ones(op.shape[0])
    assert torch.equal(model[1].running_mean, before)


def test_refresh_after_parameter_update():
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "ce", "mean", torch.float64)
    H = HessianOperator(model64, loss_fn, (X, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    assert_close(H @ v, ref_hessian(model64, loss_fn, X, y) @ v, PRODUCT_TOL[torch.float64])
    with torch.no_grad():
        for p in model64.parameters():
            p.add_(0.1)
    H.refresh()
    assert_close(H @ v, ref_hessian(model64, loss_fn, X, y) @ v, PRODUCT_TOL[torch.float64])


def test_explicit_params_subset_and_reduction_override():
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", "mean", torch.float64)
    full = ref_hessian(model64, loss_fn, X, y)
    last = list(model64.parameters())[2:]
    k = sum(p.numel() for p in last)
    H = HessianOperator(model64, loss_fn, (X, y), params=last)
    assert H.shape == (k, k)
    assert_close(H.to_dense(), full[-k:, -k:], PRODUCT_TOL[torch.float64])
    # a plain function as the loss: the reduction is given explicitly

    def summed(out, target):
        return ((out - target) ** 2).sum()

    Hs = HessianOperator(model64, summed, _split(X, y, SPLIT), reduction="sum")
    assert_close(Hs.to_dense(), ref_hessian(model64, summed, X, y), PRODUCT_TOL[torch.float64])
    with pytest.raises(ValueError, match="reduction"):
        HessianOperator(model64, summed, (X, y), reduction="max")
    with pytest.raises(ValueError, match="columns"):
        HessianOperator(model64, summed, (X, y), columns="parallel")


@pytest.mark.parametrize("loss_name", ["mse", "ce", "bce"])
def test_mc_fisher_operator_is_a_fixed_psd_matrix(loss_name):
    model64, X, y, loss_fn, *_ = _problem("mlp_sigmoid", loss_name, "mean", torch.float64)
    n = sum(p.numel() for p in model64.parameters())
    ops = [
        FisherOperator(model64, loss_fn, data, fisher="mc", mc_samples=samples, columns=columns)
        for data in ((X, y), _split(X, y, SPLIT))
        # 2 samples of 3 outputs: per-sample scores; 50: their summed outer products
        for samples, columns in ((2, "loop"), (2, "vmap"), (50, "loop"), (50, "vmap"))
    ]
    for op in ops:
        F = op.to_dense()
        tol = PRODUCT_TOL[torch.float64]
        assert_close(F, F.T, tol)
        assert torch.linalg.eigvalsh(F).min() > -1e-10 * float(F.abs().max())
        # the same samples on every product: repeated products agree exactly
        v = torch.randn(n, dtype=torch.float64)
        assert torch.equal(op @ v, op @ v)
        assert_close(op @ v, F @ v, tol)
    # the loop and vmap paths use the same samples
    assert_close(ops[0].to_dense(), ops[1].to_dense(), PRODUCT_TOL[torch.float64])
    assert_close(ops[2].to_dense(), ops[3].to_dense(), PRODUCT_TOL[torch.float64])
    with pytest.raises(ValueError, match="fisher"):
        FisherOperator(model64, loss_fn, (X, y), fisher="true")
    with pytest.raises(ValueError, match="mc_samples"):
        FisherOperator(model64, loss_fn, (X, y), fisher="mc", mc_samples=0)


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


def _restrict_problem(loss_name: str = "ce"):
    torch.manual_seed(0)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", loss_name, n=8)
    loss_fn = nn.CrossEntropyLoss() if loss_name == "ce" else nn.MSELoss()
    return model, loss_fn, X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_restrict_is_the_operator_on_that_batch(cls):
    model, loss_fn, X, y, batches = _restrict_problem()
    op = cls(model, loss_fn, batches, columns="loop", cache_graphs=True)
    sub = op.restrict(batches[1])
    assert type(sub) is cls and sub.single_batch
    assert (sub.columns, sub.cache_graphs, sub.reduction) == ("loop", True, "mean")
    assert sub.distributed is False
    assert_close(sub.to_dense(), cls(model, loss_fn, batches[1]).to_dense(), TOL)
    # the restriction on one batch differs from the dataset operator (not a vacuous check)
    assert not torch.allclose(sub.to_dense(), op.to_dense())


def test_restrict_keeps_the_ggn_equal_to_the_reference():
    model, loss_fn, X, y, batches = _restrict_problem()
    sub = GGNOperator(model, loss_fn, batches).restrict(batches[0])
    assert_close(sub.to_dense(), ref_ggn(model, loss_fn, *batches[0]), TOL)


def test_restrict_keeps_the_fisher_kind_samples_and_options():
    model, loss_fn, X, y, batches = _restrict_problem()
    gen = torch.Generator().manual_seed(3)
    F = FisherOperator(model, loss_fn, batches, fisher="mc", mc_samples=2, generator=gen)
    gen.manual_seed(99)  # the caller's generator moves on: the operator's samples do not
    sub = F.restrict(batches[0])
    assert (sub.fisher, sub.mc_samples) == ("mc", 2)
    expected = FisherOperator(
        model,
        loss_fn,
        batches[0],
        fisher="mc",
        mc_samples=2,
        generator=torch.Generator().manual_seed(3),
    ).to_dense()
    assert_close(sub.to_dense(), expected, TOL)
    empirical = ref_empirical_fisher(model, loss_fn, *batches[0], "mean")
    assert not torch.allclose(sub.to_dense(), empirical, atol=1e-6)


def test_restrict_of_a_deprecated_kind_does_not_warn_again():
    model, loss_fn, X, y, batches = _restrict_problem()
    with pytest.warns(DeprecationWarning, match="fisher="):
        F = FisherOperator(model, loss_fn, batches, kind="mc")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert F.restrict(batches[0]).fisher == "mc"


def test_lissa_with_an_mc_fisher_uses_mc_fisher_products():
    """Regression (issue 13): the per-batch operators were rebuilt as empirical Fishers."""
    model, loss_fn, X, y, batches = _restrict_problem()
    gen = torch.Generator().manual_seed(5)
    F = FisherOperator(model, loss_fn, batches, fisher="mc", mc_samples=4, generator=gen)
    per_batch = [
        FisherOperator(
            model,
            loss_fn,
            b,
            fisher="mc",
            mc_samples=4,
            generator=torch.Generator().manual_seed(5),
        )
        for b in batches
    ]
    b = torch.randn(F.shape[0], dtype=torch.float64)

    def solve(A):  # the same batch sequence for every call
        g = torch.Generator().manual_seed(0)
        return lissa(A, b, depth=60, scale=5.0, damping=0.5, generator=g, warn=False).x

    got, want = solve(F), solve(per_batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    empirical = [FisherOperator(model, loss_fn, bb, fisher="empirical") for bb in batches]
    wrong = solve(empirical)
    assert float((got - wrong).norm()) > 1e-3 * float(got.norm())


def test_fisher_keyword_and_type2():
    model, loss_fn, X, y, batches = _restrict_problem()
    F2 = FisherOperator(model, loss_fn, (X, y), fisher="type2")
    assert_close(F2.to_dense(), ref_ggn(model, loss_fn, X, y), TOL)
    Fe = FisherOperator(model, loss_fn, (X, y))
    assert Fe.fisher == "empirical"
    assert_close(Fe.to_dense(), ref_empirical_fisher(model, loss_fn, X, y, "mean"), TOL)
    with pytest.raises(ValueError, match="fisher"):
        FisherOperator(model, loss_fn, (X, y), fisher="true")
    with pytest.raises(ValueError, match="fisher= only"):
        FisherOperator(model, loss_fn, (X, y), fisher="mc", kind="mc")
    with pytest.warns(DeprecationWarning, match="fisher="):
        Fk = FisherOperator(model, loss_fn, (X, y), kind="empirical")
    with pytest.warns(DeprecationWarning, match=r"\.fisher"):
        assert Fk.kind == "empirical"


# ------------------------------------------------------- weighted and ignored targets (mean)
# torch's mean of these losses divides by the class weights of the valid targets: the
# dataset loss is sum_i w_i l_i / sum_i w_i, and each batch weighs by its share of the weights
IGNORED = [2, 3, 7]  # with batches of 2, the second batch has no valid target


def _weighted_problem(loss_name: str):
    torch.manual_seed(2)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", "ce", n=N_DATA)
    y[IGNORED] = -100
    return model, nn.CrossEntropyLoss(**WEIGHTED_LOSSES[loss_name]), X, y


def _weighted_layouts(X, y):
    """The data batched in several ways, one of them with a batch of ignored targets only."""
    loaders = [DataLoader(TensorDataset(X, y), batch_size=bs) for bs in (2, 3, 4)]
    return [*loaders, _split(X, y, SPLIT)]


def _ref_weighted_empirical_fisher(model, loss_fn, X, y) -> torch.Tensor:
    """``(1/N) sum_i g_i g_i^T``, ``g_i`` the gradient of ``N w_i l_i / W``.

    torch's mean over all the data is ``(1/N) sum_i N w_i l_i / W``: ``w_i l_i`` is the
    summed loss of example ``i`` alone, ``W`` the sum of the valid targets' class weights.
    """
    summed = nn.CrossEntropyLoss(
        weight=loss_fn.weight, label_smoothing=loss_fn.label_smoothing, reduction="sum"
    )
    valid = y != loss_fn.ignore_index
    W = float(valid.sum()) if loss_fn.weight is None else float(loss_fn.weight[y[valid]].sum())
    out = model(X)
    torch.testing.assert_close(loss_fn(out, y), summed(out, y) / W)  # the reference's premise
    n = X.shape[0]
    G = torch.stack([ref_gradient(model, summed, X[i : i + 1], y[i : i + 1]) for i in range(n)])
    G = G * (n / W)
    return G.T @ G / n


WEIGHTED_KINDS = {
    "hessian": (HessianOperator, {}, lambda m, lf, X, y: ref_hessian(m, lf, X, y)),
    "ggn": (GGNOperator, {}, lambda m, lf, X, y: ref_ggn(m, lf, X, y)),
    "type2": (FisherOperator, {"fisher": "type2"}, lambda m, lf, X, y: ref_ggn(m, lf, X, y)),
    "ef": (FisherOperator, {"fisher": "empirical"}, _ref_weighted_empirical_fisher),
}


@pytest.mark.parametrize("cache_graphs", [False, True])
@pytest.mark.parametrize("kind", list(WEIGHTED_KINDS))
@pytest.mark.parametrize("loss_name", list(WEIGHTED_LOSSES))
def test_weighted_mean_loss_gives_the_dataset_operator_however_batched(
    loss_name, kind, cache_graphs
):
    """Regression: batches weighed n_b / N, not by their share of the class weights."""
    model, loss_fn, X, y = _weighted_problem(loss_name)
    cls, kw, reference = WEIGHTED_KINDS[kind]
    A = reference(model, loss_fn, X, y)  # torch's loss on all N_DATA examples at once
    assert_close(cls(model, loss_fn, (X, y), **kw).to_dense(), A, TOL)
    for data in _weighted_layouts(X, y):
        op = cls(model, loss_fn, data, cache_graphs=cache_graphs, **kw)
        assert_close(op.to_dense(), A, TOL)
        assert op.num_data == N_DATA


def test_weighted_mean_mc_fisher_estimates_the_dataset_ggn_however_batched():
    model, loss_fn, X, y = _weighted_problem("weight")
    G = ref_ggn(model, loss_fn, X, y)
    for data in [(X, y), *_weighted_layouts(X, y)[1:]]:
        F = FisherOperator(model, loss_fn, data, fisher="mc", mc_samples=2000).to_dense()
        assert float((F - G).norm() / G.norm()) < 0.1  # batches weighed n_b / N: 0.5 and more


@pytest.mark.parametrize("loss_name", list(WEIGHTED_LOSSES))
def test_weighted_mean_loss_and_gradient_are_torchs_on_all_the_data(loss_name):
    model, loss_fn, X, y = _weighted_problem(loss_name)
    expected_loss = loss_fn(model(X), y)
    expected_grad = ref_gradient(model, loss_fn, X, y)
    for data in [(X, y), *_weighted_layouts(X, y)]:
        loss, g = GGNOperator(model, loss_fn, data).loss_and_gradient()
        assert_close(loss, expected_loss, TOL)
        assert_close(g, expected_grad, TOL)


@pytest.mark.parametrize("loss_name", list(WEIGHTED_LOSSES))
def test_padded_sequences_give_the_operator_of_all_the_tokens(loss_name):
    # each batch padded (ignore_index) to its own longest sequence, as a collate function
    # does: the batches weigh by their valid tokens' class weights, not by their sequences
    model, loss_fn, X, y, batches = padded_sequences(loss_name)
    H = HessianOperator(model, loss_fn, batches).to_dense()
    assert_close(H, ref_hessian(model, loss_fn, X, y), TOL)
    loss, g = HessianOperator(model, loss_fn, batches).loss_and_gradient()
    assert_close(loss, loss_fn(model(X), y), TOL)
    assert_close(g, ref_gradient(model, loss_fn, X, y), TOL)


def test_data_whose_every_target_is_ignored_is_refused_clearly():
    model, loss_fn, X, y = _weighted_problem("ignore_index")
    y = torch.full_like(y, -100)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for data in [(X, y), DataLoader(TensorDataset(X, y), batch_size=4)]:
        op = HessianOperator(model, loss_fn, data)
        with pytest.raises(ValueError, match="ignore_index"):
            op @ v
        with pytest.raises(ValueError, match="ignore_index"):
            op.loss_and_gradient()
    # a sum of no terms is zero, not an error
    summed = nn.CrossEntropyLoss(reduction="sum")
    op = HessianOperator(model, summed, DataLoader(TensorDataset(X, y), batch_size=4))
    assert torch.equal(op @ v, torch.zeros_like(v))


def test_unweighted_mean_weighs_batches_by_their_examples_exactly():
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "ce", "mean", torch.float64)
    batches = _split(X, y, SPLIT)
    v = torch.randn(sum(p.numel() for p in model64.parameters()), dtype=torch.float64)
    acc = torch.zeros_like(v)
    for b in batches:
        acc.add_(HessianOperator(model64, loss_fn, b) @ v, alpha=float(b[0].shape[0]))
    assert torch.equal(HessianOperator(model64, loss_fn, batches) @ v, acc / N_DATA)


# ------------------------------------------------------------------------- the reduction
def test_a_reduction_contradicting_the_loss_is_refused():
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", "mean", torch.float64)
    batches = _split(X, y, SPLIT)
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model64, nn.MSELoss(), batches, reduction="sum")
    with pytest.raises(ValueError, match="contradicts"):
        GGNOperator(model64, nn.MSELoss(reduction="sum"), (X, y), reduction="mean")
    summed = nn.MSELoss(reduction="sum")
    H = HessianOperator(model64, summed, batches, reduction="sum")  # agreeing is fine
    assert_close(H.to_dense(), ref_hessian(model64, summed, X, y), TOL)


def test_a_plain_function_that_sums_over_several_batches_warns_once():
    import warnings

    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "mse", "mean", torch.float64)
    batches = _split(X, y, SPLIT)
    v = torch.randn(sum(p.numel() for p in model64.parameters()), dtype=torch.float64)

    def summed(out, target):
        return ((out - target) ** 2).sum()

    def mean(out, target):
        return ((out - target) ** 2).mean()

    op = HessianOperator(model64, summed, batches)
    with pytest.warns(UserWarning, match='reduction="sum"'):
        op @ v
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op @ v  # once
        HessianOperator(model64, summed, batches, reduction="sum") @ v
        HessianOperator(model64, summed, (X, y)) @ v  # one batch: no dependence on batching
        H = HessianOperator(model64, mean, batches)
        assert_close(H.to_dense(), ref_hessian(model64, mean, X, y), TOL)


# -------------------------------------------------------------------------- kept graphs
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
@pytest.mark.parametrize("cache_graphs", [False, True])
def test_kept_graphs_follow_an_optimizer_step(cls, cache_graphs):
    """Regression: the kept graphs raised autograd's "modified by an inplace operation"."""
    model64, X, y, loss_fn, *_ = _problem("mlp_tanh", "ce", "mean", torch.float64)
    reference = ref_hessian if cls is HessianOperator else ref_ggn
    data = _split(X, y, SPLIT) if cache_graphs else (X, y)
    op = cls(model64, loss_fn, data, cache_graphs=cache_graphs)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert_close(op @ v, reference(model64, loss_fn, X, y) @ v, TOL)
    assert op._kept_states() is op._kept_states()  # unchanged parameters: kept
    opt = torch.optim.SGD(model64.parameters(), lr=0.5)
    loss_fn(model64(X), y).backward()
    opt.step()
    assert_close(op @ v, reference(model64, loss_fn, X, y) @ v, TOL)
    # a write through .data bumps no version counter: refresh() is needed
    for p in model64.parameters():
        p.data.mul_(1.5)
    op.refresh()
    assert_close(op @ v, reference(model64, loss_fn, X, y) @ v, TOL)


# ------------------------------------------------------------------ restrict, continued
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator, FisherOperator])
def test_restrict_with_parameters_given_as_a_generator(cls):
    """Regression: the recorded generator was consumed: "no parameters given"."""
    model, loss_fn, X, y, batches = _restrict_problem()
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
