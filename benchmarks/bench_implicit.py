"""Implicit differentiation benchmark: accuracy, memory and overhead, side by side with torchopt.

Run:  .venv/bin/python benchmarks/bench_implicit.py [--repeats 15]

1. Ridge regression, per-feature penalties exp(h_j), scikit-learn diabetes, condition
   number ~400: relative error of the hypergradient vs the closed form, Hessian-vector
   products used; torchopt's custom_root with its CG and its default normal-CG.
2. L2-regularized logistic regression, per-feature penalties, breast_cancer: relative
   error vs a dense float64 IFT at a Newton optimum (itself checked by finite differences).
3. iMAML (sinusoid MLP): cosine of the CG meta-gradient to a dense solve; peak bytes of
   tensors saved for backward as inner steps go 1 -> 100, vs unrolled MAML.
4. Overhead per hypergradient (fixed number of CG iterations) vs a hand-written
   double-backward CG loop and vs torchopt.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import numpy as np
import torch
import torchopt
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from torch.func import functional_call, grad, hessian, jacrev

import second
from second.implicit import imaml

torch.set_default_dtype(torch.float64)
F64 = torch.float64
bce = torch.nn.functional.binary_cross_entropy_with_logits
rows: list[str] = []


def rel(a, b):
    return second.relative_error(a, b)


def counting(matvec, box):
    def mv(x):
        box[0] += 1
        return matvec(x)

    return mv


def torchopt_hypergradient(inner, outer, w_star, h, solve):
    """d outer / d h via torchopt.diff.implicit.custom_root with a given linear solver."""
    optimality = grad(inner, argnums=0)  # F(w, h) = grad_w inner

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def solver(w0, h):
        return w_star.clone()

    hh = h.clone().requires_grad_(True)
    w = solver(torch.zeros_like(w_star), hh)
    (g,) = torch.autograd.grad(outer(w, hh), hh)
    return g


def standardize(X):
    return (X - X.mean(0)) / X.std(0)


# ----------------------------------------------------------------------------- 1. ridge
def bench_ridge():
    X, y = load_diabetes(return_X_y=True)
    X = torch.tensor(standardize(X))
    y = torch.tensor((y - y.mean()) / y.std())
    Xt, yt, Xv, yv = X[:300], y[:300], X[300:], y[300:]
    n, d = Xt.shape
    h = torch.full((d,), float(np.log(3e-3)))

    def inner(w, h):
        return 0.5 * ((Xt @ w - yt) ** 2).mean() + 0.5 * (h.exp() * w**2).sum()

    def outer(w, h):
        return 0.5 * ((Xv @ w - yv) ** 2).mean()

    A = Xt.T @ Xt / n + torch.diag(h.exp())
    cond = float(torch.linalg.cond(A))
    w_star = torch.linalg.solve(A, Xt.T @ yt / n)
    gv = Xv.T @ (Xv @ w_star - yv) / len(yv)
    exact = -h.exp() * w_star * torch.linalg.solve(A, gv)

    res = second.hypergradient(inner, outer, w_star, h)
    rows.append(
        f"| ridge / diabetes (d={d}, cond {cond:.0f}) | second.hypergradient (CG, default tol) "
        f"| {rel(res.grad, exact):.1e} | {res.solve.matvecs} HVPs (budget {2 * d}) |"
    )
    for name, solve in [
        ("torchopt custom_root + solve_cg() (defaults)", torchopt.linear_solve.solve_cg()),
        ("torchopt custom_root default (solve_normal_cg())", None),
    ]:
        box = [0]
        inner_solve = solve or torchopt.linear_solve.solve_normal_cg()
        g = torchopt_hypergradient(
            inner, outer, w_star, h, lambda mv, b, s=inner_solve, box=box: s(counting(mv, box), b)
        )
        rows.append(f"| | {name} | {rel(g, exact):.1e} | {box[0]} matvecs |")
    return rel(res.grad, exact), res.solve.matvecs, d


# ----------------------------------------------------------------------------- 2. logistic
def newton(inner, w, h, iters=30):
    for _ in range(iters):
        w = w - torch.linalg.solve(hessian(inner)(w, h), jacrev(inner)(w, h))
    return w


def bench_logistic():
    X, t = load_breast_cancer(return_X_y=True)
    X = torch.tensor(standardize(X))
    X = torch.cat([X, torch.ones(len(X), 1)], 1)  # bias column, not penalized
    t = torch.tensor(t, dtype=F64)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:400], perm[400:]
    d = X.shape[1]

    def inner(w, h):
        return bce(X[tr] @ w, t[tr]) + 0.5 * (h.exp() * w[:-1] ** 2).sum()

    def outer(w, h):
        return bce(X[va] @ w, t[va])

    h = torch.linspace(-4.0, -1.0, d - 1)
    w = newton(inner, torch.zeros(d), h)
    H = hessian(inner)(w, h)
    C = jacrev(jacrev(inner, argnums=0), argnums=1)(w, h)
    ref = -C.T @ torch.linalg.solve(H, jacrev(outer)(w, h))
    eps, fd = 1e-5, torch.empty(d - 1)
    for j in range(d - 1):
        e = torch.zeros(d - 1)
        e[j] = eps
        fd[j] = (
            outer(newton(inner, w, h + e, 6), h + e) - outer(newton(inner, w, h - e, 6), h - e)
        ) / (2 * eps)
    res = second.hypergradient(inner, outer, w, h)
    cond = float(torch.linalg.cond(H))
    rows.append(
        f"| logistic / breast_cancer (d={d}, cond {cond:.0f}) | dense IFT at Newton optimum vs central FD "
        f"| {rel(ref, fd):.1e} | (reference check) |"
    )
    rows.append(
        f"| | second.hypergradient (CG, default tol) | {rel(res.grad, ref):.1e} | {res.solve.matvecs} HVPs |"
    )
    for name, solve in [
        ("torchopt solve_cg() (defaults)", torchopt.linear_solve.solve_cg()),
        ("torchopt default (solve_normal_cg())", torchopt.linear_solve.solve_normal_cg()),
    ]:
        box = [0]
        g = torchopt_hypergradient(
            inner, outer, w, h, lambda mv, b, s=solve, box=box: s(counting(mv, box), b)
        )
        rows.append(f"| | {name} | {rel(g, ref):.1e} | {box[0]} matvecs |")
    return rel(res.grad, ref)


# ----------------------------------------------------------------------------- 3. iMAML
class SavedBytes:
    """Peak bytes of tensors alive in autograd's saved-tensor store."""

    def __init__(self):
        self.current = self.peak = 0

    def __enter__(self):
        tracker = self

        class Box:
            __slots__ = ("t", "n")

            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                tracker.current += self.n
                tracker.peak = max(tracker.peak, tracker.current)

            def __del__(self):
                tracker.current -= self.n

        self._ctx = torch.autograd.graph.saved_tensors_hooks(Box, lambda b: b.t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def sinusoid_setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    amp, phase = 0.1 + 4.9 * torch.rand(1, generator=g), np.pi * torch.rand(1, generator=g)
    xs = 10 * torch.rand(10, 1, generator=g) - 5
    xq = 10 * torch.rand(10, 1, generator=g) - 5
    ys, yq = amp * torch.sin(xs - phase), amp * torch.sin(xq - phase)
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 40),
        torch.nn.ReLU(),
        torch.nn.Linear(40, 1),
    )
    torch.manual_seed(seed)
    net = net.to(F64)
    theta = {k: v.detach() for k, v in net.named_parameters()}

    def task(p):
        return ((functional_call(net, p, (xs,)) - ys) ** 2).mean()

    def test(p):
        return ((functional_call(net, p, (xq,)) - yq) ** 2).mean()

    return theta, task, test


def bench_imaml():
    theta, task, test = sinusoid_setup()
    # at a random initialization the task Hessian has eigenvalues down to about -7 after
    # adaptation: lambda = 10 keeps I + H / lambda positive definite, so CG applies
    lam, lr = 10.0, 0.02
    w = imaml.adapt(task, theta, lam, steps=100, lr=lr)
    g, res = imaml.meta_gradient(task, test, w, lam, tol=1e-12, maxiter=500)
    keys = list(theta)
    shapes = [theta[k].shape for k in keys]

    def unflat(z):
        out, o = {}, 0
        for k, s in zip(keys, shapes, strict=True):
            m = int(torch.Size(s).numel())
            out[k] = z[o : o + m].reshape(s)
            o += m
        return out

    z = torch.cat([w[k].reshape(-1) for k in keys])
    P = z.numel()
    H = hessian(lambda z: task(unflat(z)))(z)
    gt = jacrev(lambda z: test(unflat(z)))(z)
    dense = torch.linalg.solve(torch.eye(P) + H / lam, gt)
    got = torch.cat([g[k].reshape(-1) for k in keys])
    cos = second.cosine_similarity(got, dense)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    g5, res5 = imaml.meta_gradient(task, test, w, lam, maxiter=5, warn=False)
    cos5 = second.cosine_similarity(torch.cat([g5[k].reshape(-1) for k in keys]), dense)
    rows.append(
        f"| iMAML sinusoid MLP (P={P}, lambda={lam}, min eig H {lam_min:.1f}) | imaml.meta_gradient (CG to 1e-12) "
        f"| cosine {cos:.8f} (rel {rel(got, dense):.1e}) | {res.matvecs} HVPs |"
    )
    rows.append(
        f"| | imaml.meta_gradient, 5 CG steps (the paper's budget) | cosine {cos5:.6f} | {res5.matvecs} HVPs |"
    )

    mem = []
    for steps in (1, 10, 100):
        with SavedBytes() as imp:
            w = imaml.adapt(task, theta, lam, steps=steps, lr=lr)
            imaml.meta_gradient(task, test, w, lam, maxiter=5, warn=False)
        th = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        with SavedBytes() as unr:  # unrolled MAML: differentiate through every inner step
            p = dict(th)
            for _ in range(steps):
                gs = torch.autograd.grad(task(p), list(p.values()), create_graph=True)
                p = {k: v - lr * gk for (k, v), gk in zip(p.items(), gs, strict=True)}
            torch.autograd.grad(test(p), list(th.values()))
        mem.append((steps, imp.peak, unr.peak))
    for steps, a, b in mem:
        rows.append(
            f"| | saved-tensor peak, {steps} inner steps: iMAML {a / 1e6:.2f} MB, unrolled MAML {b / 1e6:.2f} MB | | |"
        )
    return cos, mem


# ----------------------------------------------------------------------------- 4. overhead
def handwritten(inner, outer, w, h, iters):
    """The baseline: one gradient graph, `iters` CG steps of double backward, one mixed product."""
    w = w.detach().requires_grad_(True)
    h = h.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(inner(w, h), w, create_graph=True)
    gw, gh = torch.autograd.grad(outer(w, h), (w, h), allow_unused=True)
    x = torch.zeros_like(gw)
    r = gw.clone()
    p = r.clone()
    rr = r @ r
    for _ in range(iters):
        (Ap,) = torch.autograd.grad(g, w, p, retain_graph=True)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    (cross,) = torch.autograd.grad(g, h, x)
    return (torch.zeros_like(h) if gh is None else gh) - cross


def timeit(fns, repeats):
    """Median seconds of each function, measured interleaved (a load change hits all alike)."""
    for fn in fns:
        fn()
    ts = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(ts, fns, strict=True):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def overhead_problems():
    X, t = load_breast_cancer(return_X_y=True)
    X = torch.tensor(standardize(X))
    t = torch.tensor(t, dtype=F64)

    def lin_inner(w, h):
        return bce(X @ w, t) + 0.5 * (h.exp() * w**2).sum()

    def lin_outer(w, h):
        return bce(X[:100] @ w, t[:100])

    w = 0.1 * torch.randn(30, generator=torch.Generator().manual_seed(0))
    yield "logistic / breast_cancer (30 params)", lin_inner, lin_outer, w, torch.full((30,), -2.0)

    Xd, yd = load_digits(return_X_y=True)
    Xd = torch.tensor(standardize(Xd + 1e-3 * np.random.default_rng(0).standard_normal(Xd.shape)))
    yd = torch.tensor(yd)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)
    ).to(F64)
    names = [k for k, _ in net.named_parameters()]
    shapes = [v.shape for _, v in net.named_parameters()]
    w0 = torch.cat([v.detach().reshape(-1) for _, v in net.named_parameters()])

    def unflat(z):
        out, o = {}, 0
        for k, s in zip(names, shapes, strict=True):
            m = int(torch.Size(s).numel())
            out[k] = z[o : o + m].reshape(s)
            o += m
        return out

    ce = torch.nn.functional.cross_entropy

    def mlp_inner(z, h):
        return (
            ce(functional_call(net, unflat(z), (Xd[:1000],)), yd[:1000])
            + 0.5 * (h.exp() * z**2).sum()
        )

    def mlp_outer(z, h):
        return ce(functional_call(net, unflat(z), (Xd[1000:],)), yd[1000:])

    yield (
        f"MLP 64-128-10 / digits ({w0.numel()} params, per-parameter decay)",
        mlp_inner,
        mlp_outer,
        w0,
        torch.full_like(w0, 1.0),
    )


def overhead_one(name, inner, outer, w, h, repeats, iters):
    def ours():
        return second.hypergradient(
            inner, outer, w, h, method="cg", tol=0.0, maxiter=iters, warn=False
        ).grad

    ref = handwritten(inner, outer, w, h, iters)
    res = second.hypergradient(inner, outer, w, h, method="cg", tol=0.0, maxiter=iters, warn=False)
    assert res.solve.iterations == iters and not res.solve.negative_curvature
    agree = rel(res.grad, ref)
    solve = torchopt.linear_solve.solve_cg(maxiter=iters, rtol=0.0)

    @torchopt.diff.implicit.custom_root(grad(inner, argnums=0), argnums=1, solve=solve)
    def solver(w0, h):
        return w.clone()

    def theirs():
        hh = h.clone().requires_grad_(True)
        return torch.autograd.grad(outer(solver(w, hh), hh), hh)[0]

    t_hand, t_ours, t_opt = timeit(
        [lambda: handwritten(inner, outer, w, h, iters), ours, theirs], repeats
    )
    rows.append(
        f"| {name}, {iters} CG iterations | hand-written {t_hand * 1e3:.1f} ms, second {t_ours * 1e3:.1f} ms "
        f"(**{t_ours / t_hand:.2f}x**), torchopt {t_opt * 1e3:.1f} ms ({t_opt / t_hand:.2f}x) "
        f"| second vs hand-written {agree:.0e}, torchopt vs hand-written {rel(theirs(), ref):.0e} | |"
    )
    return t_ours / t_hand


def bench_overhead(repeats, iters=20):
    return [overhead_one(*problem, repeats, iters) for problem in overhead_problems()]


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", DeprecationWarning)
    warnings.simplefilter("ignore", FutureWarning)  # torchopt calls functorch.vjp
    t0 = time.time()
    e_ridge, hvps, d = bench_ridge()
    e_log = bench_logistic()
    cos, mem = bench_imaml()
    ratios = bench_overhead(args.repeats)
    print("| problem | method | error | cost |")
    print("|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(
        f"targets: ridge rel <= 1e-8 within {2 * d} HVPs: {e_ridge:.1e} in {hvps} -> "
        f"{'met' if e_ridge <= 1e-8 and hvps <= 2 * d else 'MISSED'}"
    )
    print(f"         logistic rel <= 1e-8: {e_log:.1e} -> {'met' if e_log <= 1e-8 else 'MISSED'}")
    print(f"         iMAML cosine >= 0.9999: {cos:.8f} -> {'met' if cos >= 0.9999 else 'MISSED'}")
    flat = mem[-1][1] <= 1.05 * mem[0][1]
    print(
        f"         iMAML memory flat 1 -> 100 steps: {mem[0][1] / 1e6:.2f} -> {mem[-1][1] / 1e6:.2f} MB "
        f"(unrolled {mem[0][2] / 1e6:.2f} -> {mem[-1][2] / 1e6:.2f} MB) -> {'met' if flat else 'MISSED'}"
    )
    print(
        f"         overhead <= 1.5x hand-written: {', '.join(f'{r:.2f}x' for r in ratios)} -> "
        f"{'met' if max(ratios) <= 1.5 else 'MISSED'}"
    )
    print(
        f"total {time.time() - t0:.0f} s, torch {torch.__version__}, torchopt {torchopt.__version__}"
    )


if __name__ == "__main__":
    main()
