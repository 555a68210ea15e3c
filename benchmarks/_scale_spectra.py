"""Spectra at scale: top-1/top-5 Hessian eigenvalues and the trace of a ~600k-parameter CNN.

Run through the scale benchmark (one thread, as the BENCHMARKS figures were measured):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --part spectra \\
        [--n 2000] [--only second,pyhessian,eigenthings,curvlinops] [--quantity top1,top5,trace]

Model: a CNN conv(1->32, 3x3) - ReLU - maxpool - conv(32->64, 3x3) - ReLU - maxpool -
linear(3136->184) - ReLU - linear(184->10), 597,874 parameters, float32, CrossEntropyLoss.
Data: synthetic 1x28x28 images, ten smooth random class prototypes plus noise (labels the
class, 20% of the labels random), ``--n`` examples in batches of 250; the model is trained 40
Adam steps on batches of 50 first (cached under ``--cache``), so the Hessian is that of a
partly trained network.

Every measurement runs in its own subprocess: CPU seconds of the process and wall seconds of
the call, and the peak resident memory the call added (the process's high-water mark after it
minus before it). A "data pass" is one Hessian-vector product over all the data (a block
product of ``k`` columns is ``k`` passes), counted from the library's own product count or,
where it has none, from the counting loader every library reads the data through; "reads" is
what that loader counted (examples handed out / n): a block product reads the data once for
all its columns.

Reference: the top 6 eigenpairs of the same Hessian in float64 by ``second.eigsh`` with the
residual criterion at ``tol=1e-6`` (a rigorous bound: each value is within ``1e-6 max|lambda|``
of an eigenvalue), cached as JSON; every top-k answer is compared with it. The trace has no
converged reference (that would take 597,874 products): estimates are shown with their
standard errors. curvlinops' Hutchinson trace forms the whole ``P x m`` probe block at once
(the issue measured 916 s and +5.1 GB at 100 probes), so it runs with ``--trace-probes``
probes like the others (default 30) and is skipped for ``--n`` above ``--curvlinops-trace-max-n``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LIBRARIES = ("second", "second-block1", "pyhessian", "eigenthings", "curvlinops")
QUANTITIES = ("top1", "top5", "trace")
BATCH = 250


def build_cnn(hidden: int = 184) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3136, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 10),
    )


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten smooth 28x28 prototypes (blurred noise) plus pixel noise; labels are the class, 20%
    of them replaced at random (so the loss cannot fall to zero, where a float32 Hessian of a
    saturated softmax has few correct digits)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(10, 1, 28, 28, generator=g)
    kernel = torch.ones(1, 1, 5, 5) / 25
    protos = nn.functional.conv2d(protos, kernel, padding=2) * 3
    y = torch.randint(0, 10, (n,), generator=g)
    X = protos[y] + 0.5 * torch.randn(n, 1, 28, 28, generator=g)
    noisy = torch.rand(n, generator=g) < 0.2
    y = torch.where(noisy, torch.randint(0, 10, (n,), generator=g), y)
    return X, y


class CountingLoader:
    """A fixed list of batches that counts the examples every library reads from it."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch: int = BATCH):
        self.batches = [(X[i : i + batch], y[i : i + batch]) for i in range(0, len(X), batch)]
        self.n = len(X)
        self.examples = 0

    def __iter__(self):
        for b in self.batches:
            self.examples += len(b[0])
            yield b

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def passes(self) -> float:
        return self.examples / self.n


def trained_model(
    n: int, cache: Path, dtype=torch.float32, hidden: int = 184
) -> tuple[nn.Module, CountingLoader]:
    """The CNN after 40 Adam steps on batches of 50 (cached), and a counting loader."""
    X, y = make_data(n)
    path = cache / (f"cnn_{n}.pt" if hidden == 184 else f"cnn_{n}_h{hidden}.pt")
    torch.manual_seed(0)
    model = build_cnn(hidden)
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(40):
            i = (50 * step) % n
            opt.zero_grad()
            nn.functional.cross_entropy(model(X[i : i + 50]), y[i : i + 50]).backward()
            opt.step()
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model = model.to(dtype).eval()
    return model, CountingLoader(X.to(dtype), y)


# -- one measurement (run in a subprocess) -------------------------------------------------
def _second(quantity, model, loader, args, block_size=None):
    from second import HessianOperator, eigsh, trace

    H = HessianOperator(model, nn.CrossEntropyLoss(), loader, check_deterministic=False)
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else 5
        res = eigsh(
            H,
            k=k,
            which="LA",
            tol=1e-3,
            criterion="eigenvalue",
            block_size=block_size,
            return_result=True,
            warn=False,
        )
        return {
            "values": res.eigenvalues.tolist(),
            "products": res.matvecs,
            "certified": res.converged,
            "note": f"eigsh block {res.info['block_size']}, eigenvalue criterion tol 1e-3",
        }
    out = {}
    for method in ("hutchinson", "hutch++", "xtrace"):
        est = trace(H, args.trace_probes, method=method, return_result=True)
        out[method] = (float(est.value), float(est.std_error), est.matvecs)
    return {"trace": out, "products": sum(v[2] for v in out.values())}


def _pyhessian(quantity, model, loader, args):
    from pyhessian import hessian

    h = hessian(model, nn.CrossEntropyLoss(), dataloader=loader, cuda=False)
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else 5
        vals, _ = h.eigenvalues(top_n=k, maxIter=50)  # power iteration, deflation, tol 1e-3
        return {"values": sorted(vals), "note": "power iteration, tol 1e-3, <= 50 per value"}
    tr = h.trace(maxIter=args.trace_probes, tol=1e-3)  # Hutchinson, stops on 1e-3 change
    return {"trace": {"hutchinson": (float(sum(tr) / len(tr)), None, len(tr))}}


def _eigenthings(quantity, model, loader, args):
    import hessian_eigenthings as he

    op = he.HessianOperator(model, loader, he.supervised_loss(nn.CrossEntropyLoss()))
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else 5
        steps = 20 if k == 1 else 50  # the pass counts
        res = he.lanczos(op, k=k, max_iter=steps, which="LA", seed=0)
        return {"values": sorted(res.eigenvalues.tolist()), "note": f"lanczos, {steps} steps"}
    res = he.trace(op, num_matvecs=args.trace_probes, method="hutchinson", seed=0)
    return {"trace": {"hutchinson": (float(res.estimate), None, args.trace_probes)}}


def _curvlinops(quantity, model, loader, args):
    from curvlinops import HessianLinearOperator, hutchinson_trace
    from scipy.sparse.linalg import LinearOperator
    from scipy.sparse.linalg import eigsh as scipy_eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    A = HessianLinearOperator(
        model, nn.CrossEntropyLoss(), params, loader, check_deterministic=False, num_data=loader.n
    )
    if quantity in ("top1", "top5"):
        k = 1 if quantity == "top1" else 5
        S = A.to_scipy()
        count = [0]

        def matvec(x):
            count[0] += 1
            return S @ x

        L = LinearOperator(S.shape, matvec=matvec, dtype=S.dtype)
        vals = scipy_eigsh(L, k=k, which="LA", return_eigenvectors=False)
        return {
            "values": sorted(vals.tolist()),
            "products": count[0],
            "note": "scipy eigsh (ARPACK), defaults",
        }
    if loader.n > args.curvlinops_trace_max_n:
        return {"skipped": f"n > {args.curvlinops_trace_max_n}"}
    torch.manual_seed(0)
    value = hutchinson_trace(A, args.trace_probes)
    return {
        "trace": {"hutchinson": (float(value), None, args.trace_probes)},
        "products": args.trace_probes,
    }


def _reference(model, loader, args):
    from second import HessianOperator, eigsh

    H = HessianOperator(model, nn.CrossEntropyLoss(), loader, check_deterministic=False)
    res = eigsh(H, k=6, which="LA", tol=1e-6, return_result=True, warn=False)
    return {
        "values": res.eigenvalues.tolist(),
        "products": res.matvecs,
        "certified": res.converged,
        "residuals": res.residual_norms,
        "note": "second.eigsh float64, residual criterion tol 1e-6, k=6",
    }


def _second_block1(quantity, model, loader, args):
    if quantity != "top5":
        return {"skipped": "block size 1 is the default for top1; the trace has no blocks"}
    return _second(quantity, model, loader, args, block_size=1)


RUNNERS = {
    "second": _second,
    "second-block1": _second_block1,
    "pyhessian": _pyhessian,
    "eigenthings": _eigenthings,
    "curvlinops": _curvlinops,
}


def timed(fn) -> tuple[dict, dict]:
    """``fn()`` with process CPU seconds, wall seconds and the peak resident memory it added.

    Meant for a fresh process per measurement: the peak is the process's high-water mark
    (``ru_maxrss``) after the call minus the one before it.
    """
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    cost = {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    }
    return out, cost


def one(args) -> dict:
    """One measurement in this process; the result as a dict."""
    torch.set_num_threads(1)
    library, quantity = args.one
    dtype = torch.float64 if library == "reference" else torch.float32
    model, loader = trained_model(args.n, Path(args.cache), dtype, args.hidden)
    if library == "reference":
        out, cost = timed(lambda: _reference(model, loader, args))
    else:
        out, cost = timed(lambda: RUNNERS[library](quantity, model, loader, args))
    out.update(cost, library=library, quantity=quantity, n=args.n, data_reads=loader.passes)
    out.setdefault("products", loader.passes)  # a library that reads the data per product
    return out


def _spawn(library: str, quantity: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", library, quantity, "--n", str(args.n)]
    cmd += ["--hidden", str(args.hidden)]
    cmd += ["--cache", args.cache, "--trace-probes", str(args.trace_probes)]
    cmd += ["--curvlinops-trace-max-n", str(args.curvlinops_trace_max_n)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"library": library, "quantity": quantity, "error": proc.stderr[-400:]}
    return json.loads(lines[-1])


def _agreement(values: list[float], ref: list[float]) -> float:
    """Largest relative difference to the reference's top values, in the reference's scale."""
    top = sorted(ref)[-len(values) :]
    scale = max(abs(v) for v in ref)
    return max(abs(a - b) for a, b in zip(sorted(values), top)) / scale


def _row(r: dict, ref: dict | None) -> str:
    if "error" in r:
        return f"| {r['quantity']} | {r['library']} | error: {r['error'].splitlines()[-1:]} |"
    if "skipped" in r:
        return f"| {r['quantity']} | {r['library']} | skipped ({r['skipped']}) |"
    cost = (
        f"{r['products']:g} passes ({r['data_reads']:g} reads), "
        f"{r['cpu_s']:.1f} CPU-s, {r['wall_s']:.1f} s wall, +{r['peak_mb']:.0f} MB"
    )
    if "values" in r:
        agree = f"{_agreement(r['values'], ref['values']):.1e}" if ref else "-"
        vals = ", ".join(f"{v:.4f}" for v in sorted(r["values"], reverse=True))
        return f"| {r['quantity']} | {r['library']} | {cost} | {vals} | {agree} | {r.get('note', '')} |"
    tr = "; ".join(
        f"{m} {v:.2f}" + (f" +- {e:.2f}" if e is not None else "") + f" ({c} products)"
        for m, (v, e, c) in r["trace"].items()
    )
    return f"| {r['quantity']} | {r['library']} | {cost} | {tr} | - | |"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="training examples")
    ap.add_argument(
        "--hidden",
        type=int,
        default=184,
        help="width of the hidden linear layer (184: 597,874 parameters; 3,180: 10.0M)",
    )
    ap.add_argument("--only", default=",".join(LIBRARIES), help="libraries, comma-separated")
    ap.add_argument("--quantity", default=",".join(QUANTITIES), help="top1,top5,trace")
    ap.add_argument("--trace-probes", type=int, default=30)
    ap.add_argument("--curvlinops-trace-max-n", type=int, default=2000)
    ap.add_argument(
        "--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "second_scale_v2")
    )
    ap.add_argument("--out", default="bench-output/scale_spectra.jsonl")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--one", nargs=2, metavar=("LIBRARY", "QUANTITY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    cache = Path(args.cache)
    trained_model(args.n, cache, hidden=args.hidden)  # train once, outside the measurements
    tag = "" if args.hidden == 184 else f"_h{args.hidden}"
    ref_path = cache / f"reference_{args.n}{tag}.json"
    if not ref_path.exists():
        ref = _spawn("reference", "top6", args)
        if "error" in ref:
            raise SystemExit(f"the reference failed: {ref['error']}")
        ref_path.write_text(json.dumps(ref))
    ref = json.loads(ref_path.read_text())
    print(
        f"reference ({ref['note']}): {[round(v, 5) for v in ref['values']]}, "
        f"{ref['products']} products, {ref['cpu_s']:.0f} CPU-s, certified {ref['certified']}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| quantity | library | cost | values | rel. diff. to reference | how |")
    print("|---|---|---|---|---|---|")
    for quantity in args.quantity.split(","):
        for library in args.only.split(","):
            r = _spawn(library, quantity, args)
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(_row(r, ref), flush=True)


if __name__ == "__main__":
    main()
