"""Curvature-product speed: `second` side by side with curvlinops, BackPACK and torch.func.

Every cost is reported as a ratio to one gradient computation (forward + backward) timed
in the same process and the same interleaved rounds, so a shared, noisy machine slows the
numerator and the denominator alike. Each round runs every method once in a shuffled order;
the table shows the median over rounds of (method time / gradient time).

Reference workload (issue 2, item 5): MLP 64-128-128-10 with tanh, scikit-learn digits
standardized, full batch of 1,797, cross-entropy, float32, one thread.

Rows:
  hvp      one Hessian-vector product on a fixed batch (as inside a CG loop)
  loader   one dataset Hessian-vector product over a DataLoader (batches of 256),
           relative to one dataset gradient over the same DataLoader
  ggn      one Gauss-Newton-vector product on a fixed batch
  cols     a 10-column product on a fixed batch, per column
  tiny     per-call cost on the seed's 26-parameter model (3-5-1 sigmoid MLP, 10 points, MSE),
           in microseconds and relative to one raw double-backward HVP

Usage:
    python benchmarks/bench_products.py            # full run (about 3 minutes on a loaded 2-core machine)
    python benchmarks/bench_products.py --quick    # a short run (about 1 minute)
    python benchmarks/bench_products.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from importlib import metadata

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

import second
from second import GGNOperator, HessianOperator


# ----------------------------------------------------------------------------- optional anchors
def _try_import(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as exc:  # noqa: BLE001 - an anchor that fails to import is skipped
        print(f"# {name} unavailable ({type(exc).__name__}: {exc}); its rows are skipped")
        return None


curvlinops = _try_import("curvlinops")
backpack_hf = _try_import("backpack.hessianfree.hvp")
backpack_ggn = _try_import("backpack.hessianfree.ggnvp")


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    cases: dict[str, Callable[[], object]],
    baseline: str,
    rounds: int,
    inner: int,
    device: torch.device,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Time every case next to a call of ``baseline``; return ``{name: (median s, median ratio)}``.

    Each round visits the cases in a shuffled order, and times each one right beside one
    call of ``baseline`` (the pair in random order), recording the ratio of the two: load
    that changes between pairs on a shared machine cancels out. ``inner`` calls are timed
    together and averaged (for calls of a few microseconds).
    """
    rng = random.Random(seed)
    for fn in cases.values():
        for _ in range(warmup):
            fn()

    def timed(fn) -> float:
        _sync(device)
        t0 = CLOCK[0]()
        for _ in range(inner):
            fn()
        _sync(device)
        return (CLOCK[0]() - t0) / inner

    times: dict[str, list[float]] = {k: [] for k in cases}
    RATIOS.clear()
    RATIOS.update({k: [] for k in cases})
    names = [k for k in cases if k != baseline]
    for _ in range(rounds):
        rng.shuffle(names)
        for name in names:
            pair = [baseline, name]
            rng.shuffle(pair)
            t = {n: timed(cases[n]) for n in pair}
            times[name].append(t[name])
            times[baseline].append(t[baseline])
            RATIOS[name].append(t[name] / t[baseline])
    RATIOS[baseline] = [1.0]
    return {k: (statistics.median(v), statistics.median(RATIOS[k])) for k, v in times.items()}


RATIOS: dict[str, list[float]] = {}  # per-pair ratios to the baseline, of the latest group
# The clock: the process's CPU time on CPU (a time slice lost to another process on a
# shared machine does not count), wall time where work runs on an accelerator.
CLOCK = [time.process_time]


def ratio_spread(name: str) -> str:
    """The 25th-75th percentile of the per-pair ratio of the latest group, as text."""
    r = RATIOS[name]
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
    return f"{q[0]:.2f}-{q[2]:.2f}"


# ----------------------------------------------------------------------------- workloads
def digits(device, dtype):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X - X.mean(0)) / (X.std(0) + 1e-8)  # standardized; constant pixels stay 0
    return (
        torch.as_tensor(X, dtype=dtype, device=device),
        torch.as_tensor(y, dtype=torch.long, device=device),
    )


def reference_model(device, dtype):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).to(device=device, dtype=dtype)


def seed_model(device, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)).to(device, dtype)
    X = torch.randn(10, 3, device=device, dtype=dtype)
    y = torch.randn(10, 1, device=device, dtype=dtype)
    return model, nn.MSELoss(), X, y


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def split(v: torch.Tensor, params) -> tuple[torch.Tensor, ...]:
    out, i = [], 0
    for p in params:
        out.append(v[i : i + p.numel()].view_as(p))
        i += p.numel()
    return tuple(out)


class Methods:
    """The competing implementations for one (model, loss, data) workload."""

    def __init__(self, model, loss_fn, X, y, loader=None, func_loss_fn=None):
        self.model, self.loss_fn, self.X, self.y = model, loss_fn, X, y
        self.func_loss_fn = func_loss_fn  # the same loss, written for torch.func if needed
        self.loader = loader
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.P = sum(p.numel() for p in self.params)
        p0 = self.params[0]
        g = torch.Generator(device="cpu").manual_seed(1)
        self.v = torch.randn(self.P, generator=g).to(p0.device, p0.dtype)
        self.V = torch.randn(self.P, 10, generator=g).to(p0.device, p0.dtype)
        self.vs = split(self.v, self.params)
        # graphs kept across calls (the "kept" variants)
        self.out = model(X)
        self.loss = loss_fn(self.out, y)
        self.g_kept = torch.autograd.grad(self.loss, self.params, create_graph=True)

    # -- torch.func helpers ------------------------------------------------------------
    def _f_loss(self, X, y):
        names = self.names
        loss_fn = self.func_loss_fn or self.loss_fn

        def f(ps):
            return loss_fn(functional_call(self.model, dict(zip(names, ps, strict=True)), (X,)), y)

        return f

    def _f_out(self, X):
        names = self.names
        return lambda ps: functional_call(self.model, dict(zip(names, ps, strict=True)), (X,))

    # -- baselines -----------------------------------------------------------------------
    def gradient(self, X=None, y=None):
        X = self.X if X is None else X
        y = self.y if y is None else y
        return torch.autograd.grad(self.loss_fn(self.model(X), y), self.params)

    def gradient_loader(self):
        acc = None
        for X, y in self.loader:
            g = flat(self.gradient(X, y))
            acc = g * len(y) if acc is None else acc.add_(g, alpha=len(y))
        return acc

    # -- Hessian-vector products ---------------------------------------------------------
    def double_backward(self, X=None, y=None, vs=None):
        X = self.X if X is None else X
        y = self.y if y is None else y
        vs = self.vs if vs is None else vs
        loss = self.loss_fn(self.model(X), y)
        g = torch.autograd.grad(loss, self.params, create_graph=True)
        return torch.autograd.grad(g, self.params, vs)

    def double_backward_kept(self):
        return torch.autograd.grad(self.g_kept, self.params, self.vs, retain_graph=True)

    def double_backward_kept_cols(self):
        Vs = columns_as_params(self.V, self.params)
        return torch.autograd.grad(
            self.g_kept, self.params, Vs, retain_graph=True, is_grads_batched=True
        )

    def func_hvp(self, X=None, y=None, vs=None):
        X = self.X if X is None else X
        y = self.y if y is None else y
        vs = self.vs if vs is None else vs
        return jvp(grad(self._f_loss(X, y)), (tuple(self.params),), (tuple(vs),))[1]

    def func_hvp_cols(self):
        Vs = tuple(columns_as_params(self.V, self.params))
        g = grad(self._f_loss(self.X, self.y))
        ps = tuple(p.detach() for p in self.params)
        return vmap(lambda *v: jvp(g, (ps,), (v,))[1])(*Vs)

    def func_ggn(self):
        f = self._f_out(self.X)
        ps = tuple(p.detach() for p in self.params)
        out, jv = jvp(f, (ps,), (tuple(self.vs),))
        _, hjv = jvp(grad(lambda o: self.loss_fn(o, self.y)), (out,), (jv,))
        _, pull = vjp(f, ps)
        return pull(hjv)[0]

    def backpack_hvp(self):
        return backpack_hf.hessian_vector_product(self.loss, self.params, self.vs)

    def backpack_hvp_kept(self):
        return backpack_hf.hessian_vector_product(
            self.loss, self.params, self.vs, grad_params=self.g_kept
        )

    def backpack_ggn(self):
        return backpack_ggn.ggn_vector_product_from_plist(
            self.loss, self.out, self.params, list(self.vs)
        )

    # -- loader loops for the anchors without a dataset-level operator --------------------
    def loader_loop(self, fn):
        def run():
            acc = None
            for X, y in self.loader:
                h = flat(fn(X, y, self.vs))
                acc = h * len(y) if acc is None else acc.add_(h, alpha=len(y))
            return acc

        return run


def columns_as_params(V, params):
    """The k columns of ``V`` [P, k] as parameter-shaped tensors with a leading k."""
    out, i = [], 0
    for p in params:
        out.append(V[i : i + p.numel()].T.reshape(V.shape[1], *p.shape))
        i += p.numel()
    return out


# ----------------------------------------------------------------------------- groups
def group_fixed(m: Methods, loss_fn, batch, device):
    H = HessianOperator(m.model, loss_fn, batch)
    G = GGNOperator(m.model, loss_fn, batch)
    cases = {
        "gradient": m.gradient,
        "second HessianOperator @ v": lambda: H @ m.v,
        "second hvp(loss, params, v)": lambda: second.hvp(m.loss, m.params, m.v),
        "torch double backward": m.double_backward,
        "torch double backward, graph kept": m.double_backward_kept,
        "torch.func jvp(grad)": m.func_hvp,
    }
    ggn = {
        "second GGNOperator @ v": lambda: G @ m.v,
        "second gvp(loss, out, params, v)": lambda: second.gvp(m.loss, m.out, m.params, m.v),
        "torch.func jvp/vjp GGN": m.func_ggn,
    }
    Hv = HessianOperator(m.model, loss_fn, batch, columns="vmap")
    Gv = GGNOperator(m.model, loss_fn, batch, columns="vmap")
    cols = {
        "second HessianOperator @ V": lambda: H @ m.V,
        "second HessianOperator(columns='vmap') @ V": lambda: Hv @ m.V,
        "second GGNOperator(columns='vmap') @ V": lambda: Gv @ m.V,
        "second GGNOperator @ V": lambda: G @ m.V,
        "torch double backward kept, batched": m.double_backward_kept_cols,
        "torch.func vmap(jvp(grad))": m.func_hvp_cols,
    }
    if backpack_hf is not None:
        cases["BackPACK hessian_vector_product"] = m.backpack_hvp
        cases["BackPACK hessian_vector_product, grad kept"] = m.backpack_hvp_kept
    if backpack_ggn is not None:
        ggn["BackPACK ggn_vector_product"] = m.backpack_ggn
    if curvlinops is not None:
        data = [batch]
        kw = dict(check_deterministic=False)
        cH = curvlinops.HessianLinearOperator(m.model, loss_fn, m.params, data, **kw)
        cG = curvlinops.GGNLinearOperator(m.model, loss_fn, m.params, data, **kw)
        cases["curvlinops HessianLinearOperator @ v"] = lambda: cH @ m.v
        ggn["curvlinops GGNLinearOperator @ v"] = lambda: cG @ m.v
        cols["curvlinops HessianLinearOperator @ V"] = lambda: cH @ m.V
        cols["curvlinops GGNLinearOperator @ V"] = lambda: cG @ m.V
    return cases, ggn, cols


def check_agreement(m: Methods, cases: dict, kind: str, cols: bool = False):
    """Every method computes the same product: print the worst relative deviation."""
    if kind == "hvp":
        ref = flat(m.double_backward())
    else:
        ref = flat(m.func_ggn())
    worst = []
    for name, fn in cases.items():
        if name == "gradient" or name.startswith("gradient"):
            continue
        out = fn()
        if cols:
            out = (
                out
                if isinstance(out, torch.Tensor)
                else torch.cat([t.reshape(10, -1) for t in out], dim=1).T
            )
            if out.shape[0] != m.P:
                out = out.T
            want = (
                torch.stack(
                    [flat(m.double_backward(vs=split(m.V[:, j], m.params))) for j in range(10)], 1
                )
                if "GGN" not in name
                else None
            )
            if want is None:
                continue
        else:
            out = out if isinstance(out, torch.Tensor) else flat(out)
            want = ref
        err = float((out.detach() - want).norm() / want.norm())
        worst.append((err, name))
    for err, name in sorted(worst, reverse=True)[:3]:
        print(f"#   check {kind}: {name}: relative deviation {err:.1e}")
    bad = [n for e, n in worst if e > 1e-3]
    if bad:
        raise SystemExit(f"methods disagree with the reference product: {bad}")


def group_loader(label, data, model, loss_fn, X, y, rounds, device):
    m = Methods(model, loss_fn, X, y, loader=data)
    H = HessianOperator(m.model, loss_fn, data)
    Hc = HessianOperator(m.model, loss_fn, data, cache_graphs=True)
    G = GGNOperator(m.model, loss_fn, data)
    base = "gradient over the batches"
    cases = {
        base: m.gradient_loader,
        "second HessianOperator @ v": lambda: H @ m.v,
        "second HessianOperator(cache_graphs=True) @ v": lambda: Hc @ m.v,
        "second GGNOperator @ v": lambda: G @ m.v,
        "torch double backward per batch": m.loader_loop(m.double_backward),
        "torch.func jvp(grad) per batch": m.loader_loop(m.func_hvp),
    }
    if curvlinops is not None:
        kw = dict(check_deterministic=False)
        cH = curvlinops.HessianLinearOperator(m.model, loss_fn, m.params, data, **kw)
        cG = curvlinops.GGNLinearOperator(m.model, loss_fn, m.params, data, **kw)
        cases["curvlinops HessianLinearOperator @ v"] = lambda: cH @ m.v
        cases["curvlinops GGNLinearOperator @ v"] = lambda: cG @ m.v
    if backpack_hf is not None:

        def backpack_loop(X, y, vs):
            loss = loss_fn(m.model(X), y)
            return backpack_hf.hessian_vector_product(loss, m.params, vs)

        cases["BackPACK hessian_vector_product per batch"] = m.loader_loop(backpack_loop)
    ref = flat(m.double_backward())
    n = len(y)
    for k, fn in cases.items():
        if k == base or "GGN" in k:
            continue
        out = fn()
        out = out if k.startswith(("second", "curvlinops")) else out / n
        err = float((out.detach() - ref).norm() / ref.norm())
        if err > 1e-3:
            raise SystemExit(f"{k} over the batches disagrees with the full-batch HVP: {err:.1e}")
    print(f"#   check batches: every HVP within 1e-3 of the full-batch product ({label})")
    res = interleaved(cases, base, max(3, rounds // 2), 1, device)
    report(
        f"Dataset HVP over {label}, vs one gradient over the same batches "
        "(target: second HVP <= 2.5)",
        res,
        base,
    )


def report(title, res, baseline, unit="ratio", ref_name=None):
    print(f"\n### {title}")
    if unit == "us":
        # ratios to the baseline (the kept-graph raw HVP) were measured in adjacent pairs;
        # the one to the full double backward divides two such medians
        full = res[ref_name][1]
        print(
            "| method | us / call | x raw HVP, graph kept | middle half of rounds "
            "| x raw HVP, forward + 2 backward |"
        )
        print("|---|---:|---:|---:|---:|")
        for k, (t, r) in sorted(res.items(), key=lambda kv: kv[1][1]):
            print(f"| {k} | {t * 1e6:.0f} | {r:.2f} | {ratio_spread(k)} | {r / full:.2f} |")
        return
    print("| method | x gradient (median) | middle half of rounds | ms |\n|---|---:|---:|---:|")
    for k, (t, r) in sorted(res.items(), key=lambda kv: kv[1][1]):
        spread = ratio_spread(k)
        print(f"| {k} | {r:.2f} | {spread} | {t * 1e3:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few rounds, for a smoke run")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per group")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default=None,
        help="process CPU time (default on CPU) or wall time (default on CUDA)",
    )
    ap.add_argument(
        "--only", default="hvp,ggn,cols,loader,tiny", help="comma-separated groups to run"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float32
    rounds = args.rounds or (7 if args.quick else 31)
    only = set(args.only.split(","))
    clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    CLOCK[0] = time.process_time if clock == "cpu" else time.perf_counter

    print("## Curvature products")
    print(f"# command: python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}")
    print(f"# date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    print(
        f"# machine: {dev}, {os.cpu_count()} cpus visible, "
        f"torch threads {torch.get_num_threads()}, python {platform.python_version()}"
    )
    print(
        "# versions: "
        + ", ".join(
            f"{d} {_version(d)}"
            for d in [
                "torch",
                "second",
                "curvlinops-for-pytorch",
                "backpack-for-pytorch",
                "scikit-learn",
            ]
        )
    )
    print(
        f"# rounds per group: {rounds}; clock: "
        f"{'process CPU time' if clock == 'cpu' else 'wall time'}; each ratio is taken "
        "against a gradient timed right beside it, the median over rounds is shown"
    )

    X, y = digits(device, dtype)
    model = reference_model(device, dtype)
    loss_fn = nn.CrossEntropyLoss()
    batch = (X, y)

    if only & {"hvp", "ggn", "cols"}:
        m = Methods(model, loss_fn, X, y)
        print(f"# reference model: {m.P} parameters, {X.shape[0]} examples")
        hvp_cases, ggn_cases, col_cases = group_fixed(m, loss_fn, batch, device)
        check_agreement(m, hvp_cases, "hvp")
        check_agreement(m, ggn_cases, "ggn")
        check_agreement(m, col_cases, "hvp", cols=True)
        if "hvp" in only:
            res = interleaved(hvp_cases, "gradient", rounds, 1, device)
            report(
                "Hessian-vector product, fixed batch of 1,797 (target: second <= 1.6)",
                res,
                "gradient",
            )
        if "ggn" in only:
            res = interleaved({"gradient": m.gradient, **ggn_cases}, "gradient", rounds, 1, device)
            report("GGN-vector product, fixed batch (target: second <= 2.5)", res, "gradient")
        if "cols" in only:
            res = interleaved(
                {"gradient": m.gradient, **col_cases}, "gradient", max(3, rounds // 2), 1, device
            )
            per_col = {k: v if k == "gradient" else (v[0] / 10, v[1] / 10) for k, v in res.items()}
            for k in col_cases:
                RATIOS[k] = [r / 10 for r in RATIOS[k]]
            report(
                "10-column product, fixed batch, cost per column: the whole product / 10 "
                "(target: second <= 1.8)",
                per_col,
                "gradient",
            )

    if "loader" in only:
        ds = torch.utils.data.TensorDataset(X, y)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False)
        sources = [
            ("a DataLoader (batches of 256)", loader),
            ("a list of the same 8 batches, collated beforehand (no loading cost)", list(loader)),
        ]
        for label, data in sources:
            group_loader(label, data, model, loss_fn, X, y, rounds, device)

    if "tiny" in only:
        tm, tl, tX, ty = seed_model(device, dtype)
        # torch 2.13's forward-over-reverse of nn.MSELoss fails ("ZeroTensors are immutable"):
        # torch.func gets the same loss written out
        m = Methods(tm, tl, tX, ty, func_loss_fn=lambda o, t: ((o - t) ** 2).mean())
        H = HessianOperator(tm, tl, (tX, ty))
        cases = {
            "gradient": m.gradient,
            "raw double backward, graph kept (1 backward)": m.double_backward_kept,
            "raw double backward (forward + 2 backward)": m.double_backward,
            "second HessianOperator @ v": lambda: H @ m.v,
            "second hvp(loss, params, v)": lambda: second.hvp(m.loss, m.params, m.v),
            "torch.func jvp(grad)": m.func_hvp,
        }
        if curvlinops is not None:
            cH = curvlinops.HessianLinearOperator(
                tm, tl, m.params, [(tX, ty)], check_deterministic=False
            )
            cases["curvlinops HessianLinearOperator @ v"] = lambda: cH @ m.v
        if backpack_hf is not None:
            cases["BackPACK hessian_vector_product"] = m.backpack_hvp
        kept = "raw double backward, graph kept (1 backward)"
        res = interleaved(cases, kept, rounds, 20 if args.quick else 50, device)
        report(
            f"Per-call cost on the seed's {m.P}-parameter model (target: second within 2x "
            "of a raw double-backward HVP)",
            res,
            kept,
            unit="us",
            ref_name="raw double backward (forward + 2 backward)",
        )


if __name__ == "__main__":
    main()
