"""Solver conformance side by side with SciPy: who claims convergence, at what true residual.

Runs the families of tests/solvers/conformance_cases.py (written from SciPy's own test
cases) plus the 40 x 40 Poisson problem through SciPy's cg/minres and second's cg/minres,
in float64 and float32, with the same rtol, and prints one markdown table: products used,
the convergence claim, the true relative residual of the returned x (float64), and whether
a claim is false (claimed converged, true residual above tolerance + 20 eps ||b||).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_conformance.py
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse.linalg as sla
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "solvers"))
sys.path.insert(0, str(ROOT / "tests" / "optim"))
from test_minimize_conformance import PROBLEMS, rosen, start  # noqa: E402

import second  # noqa: E402
from conformance_cases import cases, poisson2d  # noqa: E402


def scipy_run(fn, A, b, rtol):
    count = [0]
    An = A.numpy()

    def mv(v):
        count[0] += 1
        return An @ v

    op = sla.LinearOperator(A.shape, matvec=mv, rmatvec=mv, dtype=An.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            x, info = fn(op, b.numpy(), rtol=rtol)
        except ValueError as err:
            return None, f"raises {err}"[:60], count[0]
    return torch.as_tensor(np.asarray(x, dtype=An.dtype)), info == 0, count[0]


def ours_run(fn, A, b, rtol):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = fn(A, b, tol=rtol)
        except (ValueError, TypeError) as err:
            return None, str(err).split(";")[0][:60], 0
    return res.x, res.converged, res.matvecs


def rel_residual(A, x, b):
    wide = torch.complex128 if A.is_complex() else torch.float64
    r = b.to(wide) - A.to(wide) @ x.to(wide)
    return float(r.norm() / b.to(wide).norm())


def newton_problems(with_1000: bool):
    """scipy.optimize's Newton test problems: second.minimize defaults vs SciPy trust-ncg."""
    import time

    from scipy.optimize import minimize as sp_minimize

    problems = dict(PROBLEMS)
    if with_1000:
        problems["rosen-1000"] = (rosen, start(1000))
    second.minimize(rosen, start(2), gtol=1e-8)  # warm-up: torch's first-call set-up is not timed
    print("\n| problem | method | converged | iterations | final grad norm | CPU s |")
    print("|---|---|---|---|---|---|")
    for name, (fun, x0) in problems.items():
        t = time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = second.minimize(fun, x0, gtol=1e-8)
        cpu = time.process_time() - t
        print(
            f"| {name} | second.minimize (defaults) | {res.converged} | {res.nit} | {res.grad_norm:.1e} | {cpu:.2f} |"
        )

        def f(z, fun=fun):
            return float(fun(torch.as_tensor(z)))

        def jac(z, fun=fun):
            x = torch.as_tensor(z).requires_grad_(True)
            (g,) = torch.autograd.grad(fun(x), x)
            return g.numpy()

        def hessp(z, p, fun=fun):
            x = torch.as_tensor(z).requires_grad_(True)
            (g,) = torch.autograd.grad(fun(x), x, create_graph=True)
            (hv,) = torch.autograd.grad(g, x, torch.as_tensor(p))
            return hv.numpy()

        t = time.process_time()
        sp = sp_minimize(
            f,
            x0.numpy(),
            jac=jac,
            hessp=hessp,
            method="trust-ncg",
            options=dict(gtol=1e-8, maxiter=max(1000, 20 * x0.numel())),
        )
        cpu = time.process_time() - t
        gn = float(np.linalg.norm(jac(sp.x)))
        print(
            f"| {name} | SciPy trust-ncg (torch callbacks) | {bool(sp.success)} | {sp.nit} | {gn:.1e} | {cpu:.2f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rosen-1000", action="store_true", help="add Rosenbrock-1000 (slow)")
    args = parser.parse_args()
    table = dict(cases())
    problems = [(name, c.A, c.b, c.symmetric) for name, c in table.items()]
    P = poisson2d(40)
    problems.append(("poisson2d-40x40", P, torch.arange(1600, dtype=torch.float64), True))
    print(f"scipy {scipy.__version__}, torch {torch.__version__}, second {second.__version__}\n")
    print(
        "| case | dtype | solver | products | claims converged | true rel. residual | false claim |"
    )
    print("|---|---|---|---|---|---|---|")
    false_claims = {"scipy": 0, "second": 0}
    for name, A64, b64, _sym in problems:
        for low in (False, True):
            if low:
                dt = torch.complex64 if A64.is_complex() else torch.float32
                A, b = A64.to(dt), b64.to(dt)
            else:
                A, b = A64, b64
            rtol = 1e-5 if low else 1e-8
            eps = torch.finfo(torch.float32 if low else torch.float64).eps
            for label, runner, fn in (
                ("scipy cg", scipy_run, sla.cg),
                ("second cg", ours_run, second.cg),
                ("scipy minres", scipy_run, sla.minres),
                ("second minres", ours_run, second.minres),
            ):
                x, ok, products = runner(fn, A, b, rtol)
                if x is None:
                    print(
                        f"| {name} | {str(A.dtype)[6:]} | {label} | {products} | refused: {ok} | - | no |"
                    )
                    continue
                rr = rel_residual(A, x, b)
                false = bool(ok) and rr > rtol + 20 * eps
                who = label.split()[0]
                false_claims[who] += false
                print(
                    f"| {name} | {str(A.dtype)[6:]} | {label} | {products} | {bool(ok)} | {rr:.2e} | "
                    f"{'**yes**' if false else 'no'} |"
                )
    print(
        f"\nfalse convergence claims: scipy {false_claims['scipy']}, second {false_claims['second']}"
    )
    newton_problems(args.rosen_1000)


if __name__ == "__main__":
    main()
