"""Shared cases for the kfac tests: models, losses, dense references, tolerances."""

from __future__ import annotations

import torch
from torch import nn

from second import exact_ggn

# Tolerances (named; loosening one is a visible, commented change).
EXACT_TOL = {  # KFAC vs the exact block where KFAC is exact
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
}
INVERSE_TOL = dict(rtol=1e-8, atol=1e-10)  # float64 inverses vs dense inverses

DT = torch.float64


LOSSES = {
    "mse-mean": (lambda: nn.MSELoss(), lambda n, c: torch.randn(n, c, dtype=DT)),
    "mse-sum": (lambda: nn.MSELoss(reduction="sum"), lambda n, c: torch.randn(n, c, dtype=DT)),
    "ce-mean": (lambda: nn.CrossEntropyLoss(), lambda n, c: torch.randint(0, c, (n,))),
    "ce-sum": (
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        lambda n, c: torch.randint(0, c, (n,)),
    ),
    # class probabilities (distillation, mixup): the curvature is sum_k w_k p_k times the
    # plain one (p after label smoothing); rows that sum to 0.5, class weights, smoothing
    "ce-soft": (
        lambda: nn.CrossEntropyLoss(),
        lambda n, c: torch.softmax(torch.randn(n, c, dtype=DT), 1),
    ),
    "ce-soft-half-sum": (
        lambda: nn.CrossEntropyLoss(reduction="sum"),
        lambda n, c: 0.5 * torch.softmax(torch.randn(n, c, dtype=DT), 1),
    ),
    "ce-soft-weighted-smoothed": (
        lambda: nn.CrossEntropyLoss(
            weight=torch.linspace(0.5, 2.0, 3, dtype=DT), label_smoothing=0.2
        ),
        lambda n, c: 0.5 * torch.softmax(torch.randn(n, c, dtype=DT), 1),
    ),
    "bce-mean": (lambda: nn.BCEWithLogitsLoss(), lambda n, c: torch.rand(n, c, dtype=DT).round()),
    "bce-sum": (
        lambda: nn.BCEWithLogitsLoss(reduction="sum"),
        lambda n, c: torch.rand(n, c, dtype=DT).round(),
    ),
}


def deep_linear(dtype=DT, bias=(True, False, True)):
    return nn.Sequential(
        nn.Linear(4, 5, bias=bias[0]), nn.Linear(5, 6, bias=bias[1]), nn.Linear(6, 3, bias=bias[2])
    ).to(dtype)


def tanh_net(dtype=DT):
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)
    ).to(dtype)


def param_slices(model):
    out, off = [], 0
    for p in model.parameters():
        out.append(slice(off, off + p.numel()))
        off += p.numel()
    return out


def layer_blocks(model):
    """Index ranges of every layer's (weight, bias) block in the flat parameter vector."""
    blocks, off = [], 0
    for m in model.modules():
        ps = list(m.parameters(recurse=False))
        if ps:
            n = sum(p.numel() for p in ps)
            blocks.append(slice(off, off + n))
            off += n
    return blocks


def dense_ggn(model, loss_fn, X, y):
    out = model(X)
    return exact_ggn(loss_fn(out, y), out, list(model.parameters()))


def closure_of(opt, model, loss_fn, X, y):
    """torch.optim's closure: zero the gradients, compute the loss, backward, return it."""

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    return closure


class Scaled(nn.Module):
    """A linear layer times a parameter vector: the scale is outside every supported layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))

    def forward(self, x):
        return self.lin(x) * self.scale


class TokenModel(nn.Module):
    """Embedding -> tanh -> Linear, position-wise: logits ``[B, T, V]`` (or ``[B, V, T]``)."""

    def __init__(self, vocab: int = 20, dim: int = 6, classes_first: bool = False):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.classes_first = classes_first

    def forward(self, x):
        out = self.head(torch.tanh(self.emb(x)))
        return out.transpose(1, 2) if self.classes_first else out
