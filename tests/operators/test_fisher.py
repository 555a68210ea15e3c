"""The Fisher operator (``operators/fisher.py``): empirical, Monte-Carlo and type-2.

``fisher=`` and the deprecated ``kind=``, the MC Fisher's fixed samples (also through
``restrict`` and LiSSA's per-batch operators) and its weighting of the targets.
"""

from __future__ import annotations

import pytest
import torch

from conftest import PRODUCT_TOL
from dense_reference import (
    SPLIT,
    assert_close,
    make_problem,
    ref_empirical_fisher,
    ref_ggn,
    split_batches,
    two_batch_problem,
)
from second import FisherOperator
from second._errors import SecondDeprecationWarning
from second.solvers import lissa
from weighted_cases import weighted_layouts, weighted_problem

TOL = PRODUCT_TOL[torch.float64]


@pytest.mark.parametrize("loss_name", ["mse", "ce", "bce"])
def test_mc_fisher_operator_is_a_fixed_psd_matrix(loss_name):
    model64, X, y, loss_fn, *_ = make_problem("mlp_sigmoid", loss_name, "mean", torch.float64)
    n = sum(p.numel() for p in model64.parameters())
    ops = [
        FisherOperator(model64, loss_fn, data, fisher="mc", mc_samples=samples, columns=columns)
        for data in ((X, y), split_batches(X, y, SPLIT))
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


def test_fisher_keyword_and_type2():
    model, loss_fn, X, y, batches = two_batch_problem()
    F2 = FisherOperator(model, loss_fn, (X, y), fisher="type2")
    assert_close(F2.to_dense(), ref_ggn(model, loss_fn, X, y), TOL)
    Fe = FisherOperator(model, loss_fn, (X, y))
    assert Fe.fisher == "empirical"
    assert_close(Fe.to_dense(), ref_empirical_fisher(model, loss_fn, X, y, "mean"), TOL)
    with pytest.raises(ValueError, match="fisher"):
        FisherOperator(model, loss_fn, (X, y), fisher="true")


def test_kind_is_the_deprecated_spelling_of_fisher():
    model, loss_fn, X, y, batches = two_batch_problem()
    new = FisherOperator(model, loss_fn, (X, y), fisher="type2")
    match = r"FisherOperator\(kind=\.\.\.\) is deprecated and stops working in 0\.3: use fisher="
    with pytest.warns(SecondDeprecationWarning, match=match) as rec:
        old = FisherOperator(model, loss_fn, (X, y), kind="type2")
    assert rec[0].filename == __file__  # the warning points at the caller's line
    assert old.fisher == "type2"
    assert_close(old.to_dense(), new.to_dense(), TOL)
    with pytest.warns(
        SecondDeprecationWarning, match=r"FisherOperator\.kind .*0\.3.*\.fisher"
    ) as rec:
        assert old.kind == "type2"
    assert rec[0].filename == __file__
    with pytest.raises(ValueError, match="pass fisher only"):
        with pytest.warns(SecondDeprecationWarning):
            FisherOperator(model, loss_fn, (X, y), fisher="mc", kind="mc")
    with pytest.raises(TypeError, match="bogus"):
        FisherOperator(model, loss_fn, (X, y), fisher="mc", bogus=1)


def test_restrict_keeps_the_fisher_kind_samples_and_options():
    model, loss_fn, X, y, batches = two_batch_problem()
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
    model, loss_fn, X, y, batches = two_batch_problem()
    with pytest.warns(DeprecationWarning, match="fisher="):
        F = FisherOperator(model, loss_fn, batches, kind="mc")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert F.restrict(batches[0]).fisher == "mc"


def test_lissa_with_an_mc_fisher_uses_mc_fisher_products():
    """Regression (issue 13): the per-batch operators were rebuilt as empirical Fishers."""
    model, loss_fn, X, y, batches = two_batch_problem()
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


def test_weighted_mean_mc_fisher_estimates_the_dataset_ggn_however_batched():
    model, loss_fn, X, y = weighted_problem("weight")
    G = ref_ggn(model, loss_fn, X, y)
    for data in [(X, y), *weighted_layouts(X, y)[1:]]:
        F = FisherOperator(model, loss_fn, data, fisher="mc", mc_samples=2000).to_dense()
        assert float((F - G).norm() / G.norm()) < 0.1  # batches weighed n_b / N: 0.5 and more
