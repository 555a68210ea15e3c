"""Weighted and padded cross-entropy cases shared by the operator and diagonal tests."""

from __future__ import annotations

import torch
from torch import nn

CLASS_WEIGHT = torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64)
WEIGHTED_LOSSES = {  # CrossEntropyLoss options: torch's mean divides by the valid weights
    "ignore_index": dict(),
    "weight": dict(weight=CLASS_WEIGHT),
    "weight-smoothing": dict(weight=CLASS_WEIGHT, label_smoothing=0.2),
}


class PerPosition(nn.Module):
    """Logits ``[n, C, T]`` computed position by position from inputs ``[n, T, 3]``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x).transpose(1, 2)


def padded_sequences(loss_name: str):
    """``(model, loss_fn, X, y, batches)``: six sequences of lengths 5, 2, 3, 1, 4, 2, each
    batch of two padded (``ignore_index``) to its own longest, as a collate function does."""
    torch.manual_seed(3)
    model = PerPosition().double()
    lengths = [5, 2, 3, 1, 4, 2]
    X = torch.randn(len(lengths), 5, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (len(lengths), 5))
    for i, n in enumerate(lengths):
        y[i, n:] = -100
    loss_fn = nn.CrossEntropyLoss(**WEIGHTED_LOSSES[loss_name])
    batches = []
    for lo in range(0, len(lengths), 2):
        T = max(lengths[lo : lo + 2])
        batches.append((X[lo : lo + 2, :T], y[lo : lo + 2, :T]))
    return model, loss_fn, X, y, batches
