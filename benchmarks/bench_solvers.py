"""Inverse-curvature solvers side by side: second vs SciPy vs curvlinops, in one process.

Problems: the seed notebook's 26-parameter sigmoid MLP (Hessian, indefinite; damped GGN)
on 5 seeds, in float64 and float32, and a 64-16-10 tanh MLP on 500 scikit-learn digits
(damped GGN). Every method solves ``A x = g`` and is scored against the dense float64
solution. Products are counted for every library (SciPy through a counting
``LinearOperator``; curvlinops by counting forward passes of the model, one per product).

Run:  .venv/bin/python benchmarks/bench_solvers.py [--quick] [--out bench-output/solvers.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import second
import second.compare
from second import cosine_similarity, relative_error
from second.problems import digits_problem, seed_problem

torch.set_num_threads(1)


def exact_solution(problem, curvature, damping):
    return second.compare.exact_solution(problem, curvature, damping)[0]


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


TARGET = {torch.float64: 1e-8, torch.float32: 1e-4}  # relative error for "matvecs to target"


def first_reaching(errors, target):
    """1-based iteration at which the relative error first reaches ``target`` (None if never)."""
    for i, e in enumerate(errors, 1):
        if e <= target:
            return i
    return None


def run_second(op, g, method, damping, tol, exact=None, **opts):
    def f():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return second.solve(op, g, method=method, damping=damping, tol=tol, **opts)

    res, t = timed(f, 3)
    errs = []
    if exact is not None and method in ("cg", "minres"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            second.solve(
                op,
                g,
                method=method,
                damping=damping,
                tol=tol,
                callback=lambda x: errs.append(relative_error(x, exact)),
                **opts,
            )
    to_target = first_reaching(errs, TARGET[g.dtype]) if errs else None
    return res.x, res.matvecs, t, res.converged, res.negative_curvature, to_target


def run_scipy(op, g, method, damping, tol, maxiter, exact=None):
    from scipy.sparse.linalg import LinearOperator, cg, minres

    A = op.damped(damping) if damping else op
    n = op.shape[0]
    count = [0]

    def mv(v):
        count[0] += 1
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=op.dtype)
        return (A @ t).numpy().astype(np.float64)

    L = LinearOperator((n, n), matvec=mv, dtype=np.float64)
    b = g.double().numpy()
    fn = {"minres": minres, "cg": cg}[method]

    def f(callback=None):
        count[0] = 0
        x, info = fn(L, b, rtol=tol, maxiter=maxiter, callback=callback)
        return x, info, count[0]

    (x, info, mv_count), t = timed(f, 3)
    errs = []
    if exact is not None:
        f(lambda xk: errs.append(relative_error(torch.as_tensor(xk), exact)))
    # SciPy spends one product on the initial residual before its first iteration
    to_target = first_reaching(errs, TARGET[g.dtype])
    to_target = None if to_target is None else to_target + 1
    return torch.as_tensor(x), mv_count, t, info == 0, None, to_target


def run_curvlinops(problem, curvature, g, method):
    from curvlinops import (
        CGInverseLinearOperator,
        GGNLinearOperator,
        HessianLinearOperator,
        NeumannInverseLinearOperator,
    )

    model = problem.model
    params = [p for p in model.parameters() if p.requires_grad]
    cls = HessianLinearOperator if curvature == "hessian" else GGNLinearOperator
    calls = [0]
    h = model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    try:
        A = cls(model, problem.loss_fn, params, [problem.data], check_deterministic=False)
        inv = CGInverseLinearOperator(A) if method == "cg" else NeumannInverseLinearOperator(A)

        def f():
            calls[0] = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    x = inv @ g
                except ValueError:  # its Neumann series stops with an error on NaN
                    x = torch.full_like(g, float("nan"))
            return x, calls[0]

        (x, mv), t = timed(f, 3)
    finally:
        h.remove()
    return x, mv, t, None, None, None


def row(problem, curvature, dtype, lib, method, result, exact):
    x, mv, t, conv, neg, to_target = result
    finite = bool(torch.isfinite(torch.as_tensor(x)).all())
    return {
        "problem": problem,
        "curvature": curvature,
        "dtype": str(dtype).replace("torch.", ""),
        "library": lib,
        "method": method,
        "cosine": cosine_similarity(torch.as_tensor(x), exact) if finite else float("nan"),
        "relerr": relative_error(torch.as_tensor(x), exact) if finite else float("nan"),
        "matvecs": mv,
        "ms": 1e3 * t,
        "converged": conv,
        "negative_curvature": neg,
        "matvecs_to_target": to_target,
    }


def seed_rows(seeds, quick):
    rows = []
    for dtype in (torch.float64, torch.float32):
        tol = 1e-10 if dtype == torch.float64 else 1e-6
        for s in seeds:
            p = seed_problem(s, dtype)
            n = p.num_params
            # -- Hessian (indefinite), undamped, as in the notebook
            exact = exact_solution(p, "hessian", 0.0)
            H = second.HessianOperator(p.model, p.loss_fn, p.data)
            g = H.gradient()
            for name, method, opts in [
                ("auto", "auto", {}),
                ("minres", "minres", {"maxiter": 4 * n}),
                (
                    "minres (f64 recurrences + reorth)",
                    "minres",
                    {"maxiter": 4 * n, "recurrence_dtype": torch.float64, "reorthogonalize": True},
                ),
                ("cg", "cg", {"maxiter": 4 * n}),
                ("neumann (auto scale)", "neumann", {}),
            ]:
                rows.append(
                    row(
                        "seed",
                        "hessian",
                        dtype,
                        "second",
                        name,
                        run_second(H, g, method, 0.0, tol, exact=exact, **opts),
                        exact,
                    )
                )
            for m in ("minres", "cg"):
                rows.append(
                    row(
                        "seed",
                        "hessian",
                        dtype,
                        "scipy",
                        m,
                        run_scipy(H, g, m, 0.0, tol, 4 * n, exact=exact),
                        exact,
                    )
                )
            for m in ("cg", "neumann"):
                rows.append(
                    row(
                        "seed",
                        "hessian",
                        dtype,
                        "curvlinops",
                        m,
                        run_curvlinops(p, "hessian", g, m),
                        exact,
                    )
                )
            # -- damped GGN (PSD)
            rows += damped_ggn_rows(
                "seed", p, dtype, tol, maxiter=dict(cg=n, minres=4 * n, neumann=20000, scipy=4 * n)
            )
    return rows


def damped_ggn_rows(problem_name, p, dtype, tol, maxiter, lam=1e-2):
    """second's CG, MINRES, Neumann, LiSSA and SciPy's MINRES, CG on ``(G + lam I) x = g``."""
    exact = exact_solution(p, "ggn", lam)
    G = second.GGNOperator(p.model, p.loss_fn, p.data)
    g = G.gradient()
    rows = []
    for name, method, opts in [
        ("cg", "cg", {"maxiter": maxiter["cg"]}),
        ("minres", "minres", {"maxiter": maxiter["minres"]}),
        ("neumann (auto scale)", "neumann", {"maxiter": maxiter["neumann"]}),
        ("lissa (auto scale)", "lissa", {}),
    ]:
        t = 1e-6 if method in ("neumann", "lissa") else tol
        result = run_second(G, g, method, lam, t, exact=exact, **opts)
        rows.append(row(problem_name, "ggn+1e-2", dtype, "second", name, result, exact))
    for m in ("minres", "cg"):
        result = run_scipy(G, g, m, lam, tol, maxiter["scipy"], exact=exact)
        rows.append(row(problem_name, "ggn+1e-2", dtype, "scipy", m, result, exact))
    return rows


def digits_rows(quick):
    p = digits_problem(0, torch.float64, n=300 if quick else 500)
    n = p.num_params
    return damped_ggn_rows(
        "digits", p, torch.float64, 1e-10, maxiter=dict(cg=n, minres=n, neumann=50000, scipy=n)
    )


def _median_or_dash(values):
    if not values or any(v is None for v in values):
        reached = [v for v in values if v is not None]
        return (
            "-"
            if not reached
            else f"{statistics.median(reached):.0f} ({len(reached)}/{len(values)} reach it)"
        )
    return f"{statistics.median(values):.0f}"


def summarize(rows):
    keys = []
    for r in rows:
        k = (r["problem"], r["curvature"], r["dtype"], r["library"], r["method"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        rs = [
            r
            for r in rows
            if (r["problem"], r["curvature"], r["dtype"], r["library"], r["method"]) == k
        ]
        cos = [r["cosine"] for r in rs]
        err = [r["relerr"] for r in rs]
        conv = [r["converged"] for r in rs]
        out.append(
            {
                "key": k,
                "cos_min": min(cos, key=lambda c: c if c == c else -1e9),
                "err_max": max(err, key=lambda e: e if e == e else 1e99),
                "mv": statistics.median(r["matvecs"] for r in rs),
                "ms": statistics.median(r["ms"] for r in rs),
                "conv": "-"
                if any(c is None for c in conv)
                else f"{sum(map(bool, conv))}/{len(conv)}",
                "to_target": _median_or_dash([r["matvecs_to_target"] for r in rs]),
            }
        )
    lines = [
        "| problem | matrix | dtype | library | method | min cosine | max rel. error | median matvecs | median ms | converged | matvecs to target error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in out:
        p, c, d, lib, m = s["key"]
        lines.append(
            f"| {p} | {c} | {d} | {lib} | {m} | {s['cos_min']:.6f} | {s['err_max']:.1e} | "
            f"{s['mv']:.0f} | {s['ms']:.1f} | {s['conv']} | {s['to_target']} |"
        )
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench-output/solvers.json")
    args = ap.parse_args()
    seeds = range(2) if args.quick else range(5)
    rows = seed_rows(seeds, args.quick) + digits_rows(args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, default=str))
    print(summarize(rows))


if __name__ == "__main__":
    main()
