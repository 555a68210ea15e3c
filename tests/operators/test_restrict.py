"""operator.restrict(batch): the same operator, kind and options, on one batch; LiSSA uses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import PRODUCT_TOL
from dense_reference import assert_close, make_data, make_model, ref_empirical_fisher, ref_ggn
from second import FisherOperator, GGNOperator, HessianOperator
from second.solvers import lissa

TOL = PRODUCT_TOL[torch.float64]


def _problem(loss_name: str = "ce"):
    torch.manual_seed(0)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", loss_name, n=8)
    loss_fn = nn.CrossEntropyLoss() if loss_name == "ce" else nn.MSELoss()
    return model, loss_fn, X, y, [(X[:4], y[:4]), (X[4:], y[4:])]


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_restrict_is_the_operator_on_that_batch(cls):
    model, loss_fn, X, y, batches = _problem()
    op = cls(model, loss_fn, batches, columns="loop", cache_graphs=True)
    sub = op.restrict(batches[1])
    assert type(sub) is cls and sub.single_batch
    assert (sub.columns, sub.cache_graphs, sub.reduction) == ("loop", True, "mean")
    assert sub.distributed is False
    assert_close(sub.to_dense(), cls(model, loss_fn, batches[1]).to_dense(), TOL)
    # the restriction on one batch differs from the dataset operator (not a vacuous check)
    assert not torch.allclose(sub.to_dense(), op.to_dense())


def test_restrict_keeps_the_ggn_equal_to_the_reference():
    model, loss_fn, X, y, batches = _problem()
    sub = GGNOperator(model, loss_fn, batches).restrict(batches[0])
    assert_close(sub.to_dense(), ref_ggn(model, loss_fn, *batches[0]), TOL)


def test_restrict_keeps_the_fisher_kind_samples_and_options():
    model, loss_fn, X, y, batches = _problem()
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
    model, loss_fn, X, y, batches = _problem()
    with pytest.warns(DeprecationWarning, match="fisher="):
        F = FisherOperator(model, loss_fn, batches, kind="mc")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert F.restrict(batches[0]).fisher == "mc"


def test_lissa_with_an_mc_fisher_uses_mc_fisher_products():
    """Regression (issue 13): the per-batch operators were rebuilt as empirical Fishers."""
    model, loss_fn, X, y, batches = _problem()
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
    model, loss_fn, X, y, batches = _problem()
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
