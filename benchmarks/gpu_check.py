"""``make gpu-check``: one short run on a CUDA device, with the figures printed.

HVP and GGN-vector products against the gradient's cost (ratios of median wall times), the
products against a float64 CPU reference, KFAC optimizer steps, and influence scores on the
device against the CPU. Without CUDA it prints one line and exits 0; ``--device cpu`` runs the
same checks on the CPU (the test suite does, to keep this script working).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

import second


def _timed(fn, device: torch.device, reps: int = 10) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _mlp(width: int, dtype, device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10)
    ).to(dtype=dtype, device=device)


def products(device: torch.device, width: int, n: int) -> None:
    """Ratios HVP/grad and GGN/grad, and agreement with a float64 CPU reference."""
    model, loss_fn = _mlp(width, torch.float32, device), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    X, y = X.to(device), y.to(device)
    params = tuple(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), generator=g).to(device)

    def grad():
        return torch.autograd.grad(loss_fn(model(X), y), params)

    def hvp():
        return second.hvp(loss_fn(model(X), y), params, v)

    def gvp():
        out = model(X)
        return second.gvp(loss_fn(out, y), out, params, v)

    t_g, t_h, t_G = (_timed(f, device) for f in (grad, hvp, gvp))
    print(f"products: {v.numel()} parameters, batch {n}, float32 on {device}")
    print(
        f"  gradient {1e3 * t_g:.2f} ms, HVP {1e3 * t_h:.2f} ms ({t_h / t_g:.1f}x), "
        f"GGN-vector {1e3 * t_G:.2f} ms ({t_G / t_g:.1f}x)"
    )
    # the same products in float64 on the device and on the CPU agree
    m64 = _mlp(width, torch.float64, device)
    out = m64(X.double())
    Hv = second.hvp(loss_fn(out, y), tuple(m64.parameters()), v.double())
    mc = _mlp(width, torch.float64, torch.device("cpu"))
    outc = mc(X.double().cpu())
    Hvc = second.hvp(loss_fn(outc, y.cpu()), tuple(mc.parameters()), v.double().cpu())
    err = float((Hv.cpu() - Hvc).norm() / Hvc.norm())
    print(f"  float64 HVP on {device} vs CPU: relative difference {err:.1e}")
    assert err < 1e-10, err


def kfac_steps(device: torch.device, width: int, n: int, steps: int = 20) -> None:
    """KFAC optimizer steps on the device: the loss falls, time per step."""
    model, loss_fn = _mlp(width, torch.float32, device), nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 64, generator=g).to(device), torch.randint(0, 10, (n,), generator=g)
    y = y.to(device)
    opt = second.optim.KFAC(model, loss_fn)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        return loss

    first = closure().item()
    t = _timed(lambda: opt.step(closure), device, reps=steps)
    last = float(loss_fn(model(X), y))
    opt.close()
    print(
        f"KFAC: {steps + 1} steps, {1e3 * t:.1f} ms/step (median), loss {first:.4f} -> {last:.4f}"
    )
    assert last < first, (first, last)


def influence(device: torch.device, n_train: int = 256, n_test: int = 8) -> None:
    """Influence scores on the device against the same computation on the CPU (float64)."""
    g = torch.Generator().manual_seed(2)
    X, y = (
        torch.randn(n_train, 64, generator=g, dtype=torch.float64),
        torch.randint(0, 10, (n_train,), generator=g),
    )
    scores = {}
    for dev in (device, torch.device("cpu")):
        model = _mlp(16, torch.float64, dev)
        inf = second.Influence(
            model,
            nn.CrossEntropyLoss(),
            (X.to(dev), y.to(dev)),
            curvature="ggn",
            damping=1e-3,
            progressbar=False,
        )
        t0 = time.perf_counter()
        scores[dev.type] = inf.scores((X[:n_test].to(dev), y[:n_test].to(dev))).cpu()
        print(f"influence ({dev}): {n_test} x {n_train} scores in {time.perf_counter() - t0:.2f} s")
    a, b = scores[device.type], scores["cpu"]
    err = float((a - b).norm() / b.norm())
    print(f"  {device} vs CPU: relative difference {err:.1e}")
    assert err < 1e-8, err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default; skips without CUDA) or cpu")
    ap.add_argument("--width", type=int, default=512, help="hidden width of the MLP (default 512)")
    ap.add_argument("--batch", type=int, default=1024, help="batch size (default 1024)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: skipped (no CUDA device)")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu-check: second {second.__version__}, torch {torch.__version__}, {name}")
    products(device, args.width, args.batch)
    kfac_steps(device, args.width, args.batch)
    influence(device)
    print("gpu-check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
