"""The exact GGN diagonal of a digits MLP: second.spectral.ggn_diagonal, timed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_diagonal.py

Digits (first 1,257 images, pixels / 16), MLP 64-256-36-10 with ReLU (26,262 parameters),
CrossEntropyLoss, batches of 128, float32, one thread. Prints process CPU seconds, wall
seconds, and the agreement with the dense GGN diagonal on a 300-example subset.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

from second import GGNOperator
from second.spectral import ggn_diagonal

torch.set_num_threads(1)


def main():
    d = load_digits()
    X = torch.tensor(d.data[:1257], dtype=torch.float32) / 16
    y = torch.tensor(d.target[:1257])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 36), nn.ReLU(), nn.Linear(36, 10)
    )
    n_params = sum(p.numel() for p in model.parameters())
    data = [(X[i : i + 128], y[i : i + 128]) for i in range(0, len(X), 128)]
    ggn_diagonal(model, nn.CrossEntropyLoss(), data[:1])  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    diag = ggn_diagonal(model, nn.CrossEntropyLoss(), data)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    print(
        f"ggn_diagonal: {n_params} parameters, {len(X)} examples: {cpu:.2f} CPU-s, {wall:.2f} s wall"
    )
    sub = (X[:300].double(), y[:300])
    model64 = model.double()
    exact = torch.diagonal(GGNOperator(model64, nn.CrossEntropyLoss(), sub).to_dense())
    fast = ggn_diagonal(model64, nn.CrossEntropyLoss(), sub)
    print(
        f"max relative difference to the dense diagonal (300 examples, float64): "
        f"{float((fast - exact).abs().max() / exact.abs().max()):.1e}"
    )
    del diag


if __name__ == "__main__":
    main()
