"""Train the digits autoencoder with second.optim.KFAC (and Adam for comparison).

scikit-learn digits (1,797 x 64, pixels / 16), 64-128-32-8-32-128-64 tanh autoencoder with
a sigmoid output, mini-batches of 256, ``nn.MSELoss()`` as the training loss. The printed
loss is the full-training squared error summed over pixels and halved, averaged over the
images (``32 * MSELoss``); the benchmark's target is 0.185.

    .venv/bin/python examples/kfac_autoencoder.py [--seed 0] [--adam]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import second

TARGET = 0.185


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    sizes = [64, 128, 32, 8, 32, 128, 64]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b), nn.Tanh() if i < len(sizes) - 2 else nn.Sigmoid()]
    return nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adam", action="store_true", help="train with Adam (lr 1e-2) instead")
    ap.add_argument("--max-iters", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(1)

    X = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    model = make_model(args.seed)
    loss_fn = nn.MSELoss()
    if args.adam:
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        opt = second.optim.KFAC(model, loss_fn)  # the paper's adaptive mode, no tuning

    g = torch.Generator().manual_seed(1000 + args.seed)
    it, elapsed = 0, 0.0
    while it < args.max_iters:
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0] - 255, 256):
            xb = X[perm[i : i + 256]]

            def closure(xb=xb):
                opt.zero_grad()
                loss = loss_fn(model(xb), xb)
                loss.backward()
                return loss

            t0 = time.perf_counter()
            opt.step(closure)
            elapsed += time.perf_counter() - t0
            it += 1
            with torch.no_grad():
                full = 32.0 * loss_fn(model(X), X).item()
            if it % 25 == 0:
                extra = ""
                if isinstance(opt, second.optim.KFAC):
                    info = opt.last_info
                    extra = f"  lr {info['alpha']:.3g}  momentum {info['mu']:.3g}  damping {info['damping']:.2e}"
                print(f"iteration {it:5d}  loss {full:.4f}  {elapsed:6.2f}s{extra}")
            if full <= TARGET:
                print(f"reached {TARGET} after {it} iterations, {elapsed:.2f}s of training")
                return
    print(f"did not reach {TARGET} in {args.max_iters} iterations")


if __name__ == "__main__":
    main()
