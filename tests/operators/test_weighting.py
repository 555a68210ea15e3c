"""How the curvature operators weigh batches (``operators/_weighting.py``).

Each batch's share of a mean loss (its examples, or its valid targets' class weights),
the reduction and its checks, and the warning for a plain-function loss that sums.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import PRODUCT_TOL
from dense_reference import (
    N_DATA,
    REDUCTIONS,
    SPLIT,
    assert_close,
    make_problem,
    ref_ggn,
    ref_gradient,
    ref_hessian,
    split_batches,
)
from second import FisherOperator, GGNOperator, HessianOperator
from weighted_cases import WEIGHTED_LOSSES, padded_sequences, weighted_layouts, weighted_problem

TOL = PRODUCT_TOL[torch.float64]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mean_reduction_is_weighted_by_batch_size_not_averaged_per_batch(reduction):
    # the naive average of per-batch Hessians differs from the dataset Hessian when
    # batches have unequal sizes; the operator must give the latter
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", reduction, torch.float64)
    batches = split_batches(X, y, [1, 9])
    H = HessianOperator(model64, loss_fn, batches).to_dense()
    per_batch = [ref_hessian(model64, loss_fn, Xb, yb) for Xb, yb in batches]
    if reduction == "mean":
        expected = (1 * per_batch[0] + 9 * per_batch[1]) / 10
        naive = (per_batch[0] + per_batch[1]) / 2
        assert not torch.allclose(H, naive)
    else:
        expected = per_batch[0] + per_batch[1]
    assert_close(H, expected, PRODUCT_TOL[torch.float64])


# ------------------------------------------------------- weighted and ignored targets (mean)
# torch's mean of these losses divides by the class weights of the valid targets: the
# dataset loss is sum_i w_i l_i / sum_i w_i, and each batch weighs by its share of the weights
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
    model, loss_fn, X, y = weighted_problem(loss_name)
    cls, kw, reference = WEIGHTED_KINDS[kind]
    A = reference(model, loss_fn, X, y)  # torch's loss on all N_DATA examples at once
    assert_close(cls(model, loss_fn, (X, y), **kw).to_dense(), A, TOL)
    for data in weighted_layouts(X, y):
        op = cls(model, loss_fn, data, cache_graphs=cache_graphs, **kw)
        assert_close(op.to_dense(), A, TOL)
        assert op.num_data == N_DATA


@pytest.mark.parametrize("loss_name", list(WEIGHTED_LOSSES))
def test_weighted_mean_loss_and_gradient_are_torchs_on_all_the_data(loss_name):
    model, loss_fn, X, y = weighted_problem(loss_name)
    expected_loss = loss_fn(model(X), y)
    expected_grad = ref_gradient(model, loss_fn, X, y)
    for data in [(X, y), *weighted_layouts(X, y)]:
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
    model, loss_fn, X, y = weighted_problem("ignore_index")
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
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "ce", "mean", torch.float64)
    batches = split_batches(X, y, SPLIT)
    v = torch.randn(sum(p.numel() for p in model64.parameters()), dtype=torch.float64)
    acc = torch.zeros_like(v)
    for b in batches:
        acc.add_(HessianOperator(model64, loss_fn, b) @ v, alpha=float(b[0].shape[0]))
    assert torch.equal(HessianOperator(model64, loss_fn, batches) @ v, acc / N_DATA)


# ------------------------------------------------------------------------- the reduction
def test_a_reduction_contradicting_the_loss_is_refused():
    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", "mean", torch.float64)
    batches = split_batches(X, y, SPLIT)
    with pytest.raises(ValueError, match="contradicts"):
        HessianOperator(model64, nn.MSELoss(), batches, reduction="sum")
    with pytest.raises(ValueError, match="contradicts"):
        GGNOperator(model64, nn.MSELoss(reduction="sum"), (X, y), reduction="mean")
    summed = nn.MSELoss(reduction="sum")
    H = HessianOperator(model64, summed, batches, reduction="sum")  # agreeing is fine
    assert_close(H.to_dense(), ref_hessian(model64, summed, X, y), TOL)


def test_a_plain_function_that_sums_over_several_batches_warns_once():
    import warnings

    model64, X, y, loss_fn, *_ = make_problem("mlp_tanh", "mse", "mean", torch.float64)
    batches = split_batches(X, y, SPLIT)
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
