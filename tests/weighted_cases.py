"""Weighted, padded and ignored-target cross-entropy cases shared by the operator tests
and the diagonal tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dense_reference import N_DATA, SPLIT, make_data, make_model, split_batches

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


IGNORED = [2, 3, 7]  # with batches of 2, the second batch has no valid target


def weighted_problem(loss_name: str):
    """``(model, loss_fn, X, y)``: N_DATA examples, the IGNORED ones' targets ignored."""
    torch.manual_seed(2)
    model = make_model("mlp_tanh")
    X, y = make_data("mlp_tanh", "ce", n=N_DATA)
    y[IGNORED] = -100
    return model, nn.CrossEntropyLoss(**WEIGHTED_LOSSES[loss_name]), X, y


def weighted_layouts(X, y):
    """The data batched in several ways, one of them with a batch of ignored targets only."""
    loaders = [DataLoader(TensorDataset(X, y), batch_size=bs) for bs in (2, 3, 4)]
    return [*loaders, split_batches(X, y, SPLIT)]
