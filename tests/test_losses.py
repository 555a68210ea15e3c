"""Losses whose curvature depends on the targets: ignored targets, class weights, pos_weight.

The curvature routines write a batch loss as ``w_b * sum_i l_i``; torch's ``ignore_index``,
``weight=`` and ``pos_weight=`` weigh the terms by the targets (and a mean divides by the
weights of the valid targets). Checked against autograd on the loss as torch computes it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import second
from second._losses import per_sample_losses, target_weights
from second.kfac import curvature_columns, output_hessian_product, output_hessian_sqrt
from second.spectral import ggn_diagonal

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)  # the same algebra two ways (float64)


def _ce_targets(shape, classes, ignore=True):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, classes, shape, generator=g)
    if ignore:
        y.view(-1)[::3] = -100
    return y


CASES = {
    "ce-ignore": (nn.CrossEntropyLoss(), (6, 4), lambda: _ce_targets((6,), 4)),
    "ce-weight": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)),
        (6, 4),
        lambda: _ce_targets((6,), 4, ignore=False),
    ),
    "ce-weight-ignore-smoothing": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), label_smoothing=0.1),
        (6, 3),
        lambda: _ce_targets((6,), 3),
    ),
    "ce-sequence-ignore": (nn.CrossEntropyLoss(), (3, 4, 5), lambda: _ce_targets((3, 5), 4)),
    # segmentation's ignore_index 255, beyond the classes, with class weights (it raised)
    "ce-weight-ignore-255": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), ignore_index=255),
        (6, 3),
        lambda: _ce_targets((6,), 3).masked_fill(_ce_targets((6,), 3) == -100, 255),
    ),
    # class probabilities that sum to 0.7, with class weights and label smoothing
    "ce-probabilities-weight-smoothing": (
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=DT), label_smoothing=0.2),
        (6, 3),
        lambda: (
            0.7
            * torch.softmax(
                torch.randn(6, 3, generator=torch.Generator().manual_seed(3), dtype=DT), 1
            )
        ),
    ),
    "ce-probabilities-sequence": (
        nn.CrossEntropyLoss(),
        (3, 4, 5),
        lambda: (
            0.5
            * torch.softmax(
                torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(3), dtype=DT), 1
            )
        ),
    ),
    "bce-pos-weight": (
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5], dtype=DT)),
        (6, 2),
        lambda: torch.randint(0, 2, (6, 2), generator=torch.Generator().manual_seed(2)).to(DT),
    ),
    "bce-weight": (
        nn.BCEWithLogitsLoss(weight=torch.tensor([2.0, 0.25], dtype=DT)),
        (6, 2),
        lambda: torch.randint(0, 2, (6, 2), generator=torch.Generator().manual_seed(2)).to(DT),
    ),
}


def _case(name, reduction):
    loss_fn, shape, targets = CASES[name]
    loss_fn = type(loss_fn)(**{**_options(loss_fn), "reduction": reduction})
    return loss_fn, torch.randn(*shape, dtype=DT), targets()


def _options(loss_fn):
    keys = ("weight", "pos_weight", "label_smoothing", "ignore_index")
    return {k: getattr(loss_fn, k) for k in keys if hasattr(loss_fn, k)}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_per_example_losses_add_up_to_the_loss(name, reduction):
    loss_fn, f, y = _case(name, reduction)
    ell = per_sample_losses(loss_fn, f, y, reduction)
    w = 1.0 / f.shape[0] if reduction == "mean" else 1.0
    torch.testing.assert_close(w * ell.sum(), loss_fn(f, y), **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_output_curvature_is_the_loss_hessian(name, reduction):
    loss_fn, f, y = _case(name, reduction)
    n = f.shape[0]
    w = 1.0 / n if reduction == "mean" else 1.0
    H = torch.autograd.functional.hessian(lambda z: loss_fn(z, y), f).reshape(
        n, -1, n, f[0].numel()
    )
    S = output_hessian_sqrt(loss_fn, f, reduction, y).reshape(-1, n, f[0].numel())
    t = torch.randn(2, *f.shape, dtype=DT)
    Ht = output_hessian_product(loss_fn, f, t, reduction, y)
    for i in range(n):
        torch.testing.assert_close(w * S[:, i].T @ S[:, i], H[i, :, i], **TOL)
        torch.testing.assert_close(
            w * Ht[:, i].reshape(2, -1), t[:, i].reshape(2, -1) @ H[i, :, i], **TOL
        )
    # the sampled columns carry the same weights: their mean over many samples is the Hessian
    # (20,000 samples: a relative standard error of about 1%; 5% is five of them)
    g = torch.Generator().manual_seed(0)
    M = curvature_columns(loss_fn, f, y, reduction, "mc", mc_samples=20000, generator=g)
    M = M.reshape(-1, n, f[0].numel())
    for i in range(n):
        err = (w * M[:, i].T @ M[:, i] - H[i, :, i]).abs().max()
        assert err <= 0.05 * H[i, :, i].abs().max() + 1e-12


def test_target_weights_of_plain_losses_are_none():
    f, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    assert target_weights(nn.CrossEntropyLoss(), f, y, "mean") is None
    assert target_weights(nn.MSELoss(), f, torch.randn(4, 3), "mean") is None
    assert target_weights(nn.CrossEntropyLoss(), f, None, "mean") is None
    all_ignored = torch.full((4,), -100)
    assert not target_weights(nn.CrossEntropyLoss(), f, all_ignored, "mean").any()


@pytest.mark.parametrize("name", ["ce-ignore", "ce-weight", "bce-pos-weight"])
def test_operators_see_the_weights(name):
    loss_fn, shape, targets = CASES[name]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, shape[1])).double()
    X, y = torch.randn(shape[0], 3, dtype=DT), targets()
    G = second.GGNOperator(model, loss_fn, (X, y)).to_dense()  # autograd on the loss as given
    torch.testing.assert_close(ggn_diagonal(model, loss_fn, (X, y)), G.diagonal(), **TOL)
    # the empirical Fisher: w_b sum_i g_i g_i^T with l_i the loss' own terms (they add up to it)
    E = second.FisherOperator(model, loss_fn, (X, y), fisher="empirical").to_dense()
    ell = per_sample_losses(loss_fn, model(X), y, "mean")
    params = list(model.parameters())
    rows = []
    for i in range(shape[0]):
        gi = torch.autograd.grad(ell[i], params, retain_graph=True)
        rows.append(torch.cat([t.reshape(-1) for t in gi]))
    J = torch.stack(rows)
    torch.testing.assert_close(E, J.T @ J / shape[0], **TOL)
    F = second.FisherOperator(
        model,
        loss_fn,
        (X, y),
        fisher="mc",
        mc_samples=4000,
        generator=torch.Generator().manual_seed(0),
    ).to_dense()
    # a Monte-Carlo estimate (4,000 samples a datum, about 2% relative standard error)
    assert (F - G).abs().max() <= 0.06 * G.abs().max()
    K = second.KFACOperator(model, loss_fn, (X, y))  # weighted losses are accepted here
    assert torch.isfinite(K.to_dense()).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("embedding", [False, True], ids=["mlp", "embedding"])
def test_kfac_with_ignored_examples_is_kfac_of_the_others(reduction, embedding):
    # ignored examples contribute neither gradient rows nor input rows: the KFAC and EK-FAC
    # matrices equal those of the batch without them (a mean then over the valid examples)
    torch.manual_seed(0)
    if embedding:
        model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Tanh(), nn.Linear(8, 3))
        X = torch.randint(0, 7, (9, 2))
    else:
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        X = torch.randn(9, 4, dtype=DT)
    model = model.double()
    y = _ce_targets((9,), 3)
    valid = y != -100
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    for make in (second.KFACOperator, second.EKFACOperator):
        full = make(model, loss_fn, (X, y)).to_dense()
        kept = make(model, loss_fn, (X[valid], y[valid])).to_dense()
        torch.testing.assert_close(full, kept, **TOL)


def test_a_sampled_target_of_the_ignored_class_still_counts():
    # ignore_index=0 with 0 a real class (padding): a Monte-Carlo draw of class 0 scored 0
    # and the Monte-Carlo Fisher lost that class's term (42% off the GGN in a test)
    import torch.nn as nn

    from second._losses import per_sample_losses

    out = torch.randn(4, 3, dtype=torch.float64)
    drawn = torch.tensor([0, 1, 0, 2])
    loss_fn = nn.CrossEntropyLoss(ignore_index=0)
    el = per_sample_losses(loss_fn, out, drawn, "mean", sampled=True)
    want = nn.functional.cross_entropy(out, drawn, reduction="none")
    torch.testing.assert_close(el, want, rtol=0, atol=0)  # the likelihood of every draw
