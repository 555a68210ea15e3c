"""Calibration metrics against direct computations."""

from __future__ import annotations

import math

import pytest
import torch

from second.laplace import brier, ece, nll, reliability


def _data(n=200, C=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(n, C, dtype=torch.float64, generator=g), 1)
    return p, torch.randint(0, C, (n,), generator=g)


def test_nll_and_brier_by_loops():
    p, y = _data()
    ref_nll = -sum(math.log(float(p[i, y[i]])) for i in range(len(y))) / len(y)
    ref_brier = sum(
        sum((float(p[i, c]) - (c == int(y[i]))) ** 2 for c in range(4)) for i in range(len(y))
    ) / len(y)
    assert abs(float(nll(p, y)) - ref_nll) < 1e-12
    assert abs(float(brier(p, y)) - ref_brier) < 1e-12


def test_ece_by_loops():
    p, y = _data()
    conf, pred = p.max(1)
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        mask = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if mask.any():
            acc = float((pred[mask] == y[mask]).double().mean())
            total += float(mask.double().mean()) * abs(acc - float(conf[mask].mean()))
    assert abs(float(ece(p, y)) - total) < 1e-12
    _, _, counts = reliability(p, y)
    assert int(counts.sum()) == 200


def test_perfectly_calibrated_and_confident():
    y = torch.tensor([0, 1, 2])
    p = torch.eye(3, dtype=torch.float64)
    assert float(ece(p, y)) == 0.0 and float(brier(p, y)) == 0.0 and float(nll(p, y)) == 0.0


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="expected"):
        nll(torch.ones(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="n_bins"):
        ece(torch.ones(2, 2) / 2, torch.tensor([0, 1]), n_bins=0)
