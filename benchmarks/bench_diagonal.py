"""The exact GGN diagonal: second.spectral.ggn_diagonal against laplace-torch and BackPACK.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_diagonal.py [--models mlp,cnn] [--n-cnn 500]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --part diagonal   # the same
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_diagonal.py --hessian-cv

Models (float32, CrossEntropyLoss with reduction "sum", batches of 128, one thread):

* ``mlp``: digits (first 1,257 images, pixels / 16), MLP 64-256-36-10 with ReLU (26,262
  parameters);
* ``cnn``: the spectra benchmark's CNN (597,874 parameters) on ``--n-cnn`` of its synthetic
  1x28x28 images.

Each library computes the exact diagonal of the GGN summed over the data, in its own
subprocess: second's ``ggn_diagonal``; laplace-torch 0.3's ``Laplace(hessian_structure="diag")``
``fit`` with its default backend (CurvlinopsGGN) and with BackPackGGN; BackPACK 1.7's
``DiagGGNExact`` extension directly. Reported: process CPU seconds, wall seconds, the peak
resident memory the call added (high-water mark after minus before) and the largest relative
difference to second's diagonal (``max |d - d_second| / max |d_second|``). ``--dense-check``
also compares second's diagonal with the dense GGN of the MLP on 300 examples in float64 (the
tests do this on small models).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _scale_spectra import build_cnn, make_data, timed  # noqa: E402

LIBRARIES = ("second", "laplace-torch", "laplace-torch-backpack", "backpack")
BATCH = 128


def _mlp_problem():
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data[:1257], dtype=torch.float32) / 16
    y = torch.tensor(d.target[:1257])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 36), nn.ReLU(), nn.Linear(36, 10)
    )
    return model, X, y


def _cnn_problem(n: int):
    X, y = make_data(n)
    torch.manual_seed(0)
    return build_cnn(), X, y


def problem(name: str, n_cnn: int):
    return _mlp_problem() if name == "mlp" else _cnn_problem(n_cnn)


def _batches(X, y):
    return [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(X), BATCH)]


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _second(model, X, y):
    from second.spectral import ggn_diagonal

    return ggn_diagonal(model, nn.CrossEntropyLoss(reduction="sum"), _batches(X, y))


def _laplace(model, X, y, backend=None):
    from bench_laplace import _import_laplace_torch

    laplace = _import_laplace_torch()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=BATCH)
    kwargs = {} if backend is None else {"backend": getattr(laplace.curvature, backend)}
    la = laplace.Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="diag", **kwargs
    )
    la.fit(loader)
    return la.H.detach()


def _backpack(model, X, y):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    model, loss_fn = extend(model), extend(nn.CrossEntropyLoss(reduction="sum"))
    total = None
    for xb, yb in _batches(X, y):
        model.zero_grad()
        with backpack(DiagGGNExact()):
            loss_fn(model(xb), yb).backward()
        d = _flat(p.diag_ggn_exact for p in model.parameters())
        total = d if total is None else total + d
    return total


RUNNERS = {
    "second": _second,
    "laplace-torch": _laplace,
    "laplace-torch-backpack": lambda m, X, y: _laplace(m, X, y, "BackPackGGN"),
    "backpack": _backpack,
}


def one(name: str, library: str, n_cnn: int, out: str) -> dict:
    torch.set_num_threads(1)
    model, X, y = problem(name, n_cnn)
    RUNNERS[library](model, X[:8], y[:8])  # warm-up (imports, first-call overheads)
    diag, cost = timed(lambda: RUNNERS[library](model, X, y))
    torch.save(diag, out)
    params = sum(p.numel() for p in model.parameters())
    return dict(cost, model=name, library=library, params=params, n=len(X))


def dense_check() -> float:
    """second's diagonal against the dense GGN (digits MLP, 300 examples, float64)."""
    from second import GGNOperator
    from second.spectral import ggn_diagonal

    model, X, y = _mlp_problem()
    model = model.double()
    sub = (X[:300].double(), y[:300])
    exact = torch.diagonal(GGNOperator(model, nn.CrossEntropyLoss(), sub).to_dense())
    fast = ggn_diagonal(model, nn.CrossEntropyLoss(), sub)
    return float((fast - exact).abs().max() / exact.abs().max())


def hessian_control_variate(probes: int = 100) -> None:
    """The Hessian diagonal from ``probes`` products, plain and with the GGN as control variate.

    Digits MLP 64-32-10 with tanh (2,410 parameters: the exact Hessian diagonal is affordable;
    with ReLU the Hessian would equal the GGN and the control variate would be exact), 1,257
    examples, float64, after 200 Adam steps. Relative error ``||d - d_exact|| / ||d_exact||``.
    """
    from second import HessianOperator, diagonal

    model, X, y = _mlp_problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    X = X.double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    H = HessianOperator(model, nn.CrossEntropyLoss(), _batches(X, y))
    exact = torch.diagonal(H.to_dense())
    print(f"Hessian diagonal, {probes} products, tanh MLP ({exact.numel():,} parameters):")
    for label, kw in [
        ("Hutchinson", {}),
        ("XDiag", {"method": "xdiag"}),
        ("Hutchinson, GGN control variate", {"control": "ggn"}),
    ]:
        est = diagonal(H, probes, return_result=True, **kw)
        err = float((est.value - exact).norm() / exact.norm())
        se = float(est.std_error.norm() / exact.norm())
        print(f"  {label}: relative error {err:.3f} (reported standard error {se:.3f})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--only", default=",".join(LIBRARIES))
    ap.add_argument("--n-cnn", type=int, default=500)
    ap.add_argument("--out", default="bench-output/diagonal")
    ap.add_argument("--timeout", type=int, default=900, help="wall seconds per measurement")
    ap.add_argument("--max-memory-gb", type=float, default=8.0, help="address space per run")
    ap.add_argument("--dense-check", action="store_true")
    ap.add_argument("--hessian-cv", action="store_true", help="the control-variate check only")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        name, library = args.one
        print(json.dumps(one(name, library, args.n_cnn, str(out / f"{name}-{library}.pt"))))
        return
    if args.hessian_cv:
        hessian_control_variate()
        return
    if args.dense_check:
        print(f"second vs dense GGN (digits MLP, 300 examples, float64): {dense_check():.1e}")
    print("| model | library | CPU s | wall s | peak MB | rel. diff. to second |")
    print("|---|---|---|---|---|---|")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in args.models.split(","):
        for library in args.only.split(","):
            cmd = [sys.executable, __file__, "--one", name, library]
            cmd += ["--n-cnn", str(args.n_cnn), "--out", str(out)]
            cap = int(args.max_memory_gb * 2**30)

            def limit(cap=cap):  # a run that would exhaust the shared machine fails instead
                resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

            try:
                proc = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=args.timeout,
                    preexec_fn=limit,
                )
            except subprocess.TimeoutExpired:
                print(f"| {name} | {library} | stopped after {args.timeout} s wall |", flush=True)
                continue
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                last = proc.stderr.strip().splitlines()[-1:]
                if "memory" in " ".join(last).lower() or proc.returncode < 0:
                    last = [f"over the {args.max_memory_gb:g} GB address-space cap ({last})"]
                print(f"| {name} | {library} | failed: {last} |", flush=True)
                continue
            r = json.loads(lines[-1])
            ref_path = out / f"{name}-second.pt"
            diff = "-"
            if library != "second" and ref_path.exists():
                ref = torch.load(ref_path)
                d = torch.load(out / f"{name}-{library}.pt").reshape(-1)
                diff = f"{float((d - ref).abs().max() / ref.abs().max()):.1e}"
            print(
                f"| {name} ({r['params']:,} params, {r['n']:,} ex.) | {library} | "
                f"{r['cpu_s']:.2f} | {r['wall_s']:.2f} | {r['peak_mb']:.0f} | {diff} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
