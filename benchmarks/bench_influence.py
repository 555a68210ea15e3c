"""Influence functions vs leave-one-out retraining on scikit-learn digits (Koh & Liang, Fig. 2).

    python benchmarks/bench_influence.py [--top 50] [--mlp-top 20] [--out bench-output/influence.json]
                                         [--skip-nonconvex]

Convex case: L2-regularized softmax regression (pixels / 16, 70/30 split, lambda on all
parameters, objective ``mean CE + lambda/2 ||theta||^2``), trained by Newton in float64
to ||grad|| < 1e-10. For the highest-loss test point, the top training points by
|dense first-order prediction| are removed one at a time (weight 0 in the same
(1/n)-normalized objective) and the model retrained by warm-started Newton to
||grad|| < 1e-12. Each method's prediction is compared with the actual change of the
test loss: Pearson correlation, least-squares slope actual/predicted, and the magnitude
ratio to the dense first-order value (``sum |method| / sum |dense|`` on the same points).

Non-convex case: a tanh MLP 64-32-10 with weight decay, trained by L-BFGS (float64, full
batch) from a fixed initialization; leave-one-out models are retrained from the same
initialization with the same optimizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import second

torch.set_default_dtype(torch.float64)


# ----------------------------------------------------------------------------- data
def digits():
    d = load_digits()
    X = torch.tensor(d.data / 16.0)
    y = torch.tensor(d.target)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0)
    return Xtr, ytr, Xte, yte


# ------------------------------------------------------------------ softmax regression
class Softmax:
    """Closed-form gradient and Hessian of w-weighted mean CE + lam/2 ||theta||^2.

    theta is laid out as nn.Linear(64, 10)'s parameters: weight (row-major), then bias.
    """

    def __init__(self, X, y, lam):
        self.Xa = torch.cat([X, torch.ones(X.shape[0], 1)], 1)
        self.Y = nn.functional.one_hot(y, 10).double()
        self.lam, self.n, self.d = lam, X.shape[0], X.shape[1]
        idx = torch.arange(10 * (self.d + 1)).reshape(10, self.d + 1)
        self.perm = torch.cat([idx[:, : self.d].reshape(-1), idx[:, self.d]])  # param <- aug

    def aug(self, theta):
        W = theta[: 10 * self.d].reshape(10, self.d)
        return torch.cat([W, theta[10 * self.d :, None]], 1)

    def objective(self, theta, w):
        Z = self.Xa @ self.aug(theta).T
        ce = torch.logsumexp(Z, 1) - (Z * self.Y).sum(1)
        return float((w * ce).sum() / self.n + 0.5 * self.lam * theta @ theta)

    def grad_hess(self, theta, w):
        Z = self.Xa @ self.aug(theta).T
        P = torch.softmax(Z, 1)
        R = (P - self.Y) * w[:, None]
        gA = R.T @ self.Xa / self.n
        g = torch.cat([gA[:, : self.d].reshape(-1), gA[:, self.d]]) + self.lam * theta
        S = (torch.diag_embed(P) - P[:, :, None] * P[:, None, :]) * w[:, None, None]
        Ha = (
            torch.einsum("iab,ic,id->acbd", S, self.Xa, self.Xa).reshape(
                10 * (self.d + 1), 10 * (self.d + 1)
            )
            / self.n
        )
        H = Ha[self.perm][:, self.perm] + self.lam * torch.eye(len(theta))
        return g, H

    def newton(self, theta, w, tol, maxiter=100):
        for _ in range(maxiter):
            g, H = self.grad_hess(theta, w)
            gn = float(g.norm())
            if gn < tol:
                return theta, gn
            step = torch.linalg.solve(H, g)
            t, f0 = 1.0, self.objective(theta, w)
            # backtracking far from the solution; near it the decrease is below the
            # objective's rounding error, and the full Newton step converges quadratically
            while (
                gn > 1e-6
                and t > 1e-10
                and self.objective(theta - t * step, w) > f0 - 1e-4 * t * float(g @ step)
            ):
                t *= 0.5
            theta = theta - t * step
        return theta, gn


def test_loss_linear(theta, x, y, d=64):
    W = theta[: 10 * d].reshape(10, d)
    z = x @ W.T + theta[10 * d :]
    return float(nn.functional.cross_entropy(z[None], y[None]))


def stats(pred, actual, dense):
    pred, actual = pred.double(), actual.double()
    r = float(torch.corrcoef(torch.stack([pred, actual]))[0, 1])
    slope = float(actual @ pred / (pred @ pred))
    mag = float(pred.abs().sum() / dense.abs().sum())
    return dict(pearson=round(r, 5), slope=round(slope, 4), magnitude=round(mag, 4))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def convex(lam, top, Xtr, ytr, Xte, yte, log):
    n = Xtr.shape[0]
    sm = Softmax(Xtr, ytr, lam)
    ones = torch.ones(n)
    theta, gn = sm.newton(torch.zeros(650), ones, 1e-10)
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight.copy_(theta[:640].reshape(10, 64))
        model.bias.copy_(theta[640:])
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(Xte), yte, reduction="none")
    t = int(losses.argmax())
    test = (Xte[t : t + 1], yte[t : t + 1])
    log(f"lambda={lam}: trained, ||grad|| = {gn:.1e}; test point {t}, loss {float(losses[t]):.3f}")
    loss_fn = nn.CrossEntropyLoss()
    base = dict(damping=lam, progressbar=False)

    res = {"lambda": lam, "test_point": t, "train_grad_norm": gn, "methods": {}, "times_s": {}}
    dense_inf = second.Influence(model, loss_fn, (Xtr, ytr), method="dense", **base)
    dense, res["times_s"]["dense"] = timed(lambda: dense_inf.scores(test)[0])
    idx = torch.argsort(dense.abs(), descending=True)[:top]

    base_loss = test_loss_linear(theta, *[a[0] for a in test])
    actual, gmax = [], 0.0
    for j in idx.tolist():
        w = ones.clone()
        w[j] = 0
        th, g = sm.newton(theta, w, 1e-12)
        gmax = max(gmax, g)
        actual.append(test_loss_linear(th, *[a[0] for a in test]) - base_loss)
    actual = torch.tensor(actual)
    res["loo_max_grad_norm"] = gmax
    log(f"  leave-one-out: {top} retrains, max ||grad|| = {gmax:.1e}")

    preds = {"dense": dense[idx]}
    cg_inf = second.Influence(model, loss_fn, (Xtr, ytr), method="cg", **base)
    cg, res["times_s"]["cg"] = timed(lambda: cg_inf.scores(test)[0])
    preds["cg"] = cg[idx]
    res["cg_rel_to_dense"] = float((cg - dense).norm() / dense.norm())
    preds["newton_loo"], res["times_s"]["newton_loo (top points)"] = timed(
        lambda: dense_inf.newton_loo(test, idx)[0]
    )
    ek, res["times_s"]["ekfac"] = timed(
        lambda: second.Influence(model, loss_fn, (Xtr, ytr), curvature="ekfac", **base).scores(
            test
        )[0]
    )
    preds["ekfac"] = ek[idx]
    for complement in ("zero", "mean", "harmonic", "weighted"):
        name = "lowrank-50" if complement == "zero" else f"lowrank-50 ({complement} complement)"
        opts = {} if complement == "zero" else {"complement": complement, "complement_probes": 30}
        scores, res["times_s"][name] = timed(
            lambda opts=opts: second.Influence(
                model, loss_fn, (Xtr, ytr), method="lowrank", rank=50, solver_options=opts, **base
            ).scores(test)[0]
        )
        preds[name] = scores[idx]
    batches = [(Xtr[i : i + 256], ytr[i : i + 256]) for i in range(0, n, 256)]
    lissa_inf = second.Influence(model, loss_fn, batches, method="lissa", **base)
    li, res["times_s"]["lissa (mini-batches of 256)"] = timed(lambda: lissa_inf.scores(test)[0])
    preds["lissa (mini-batches of 256)"] = li[idx]
    info = lissa_inf.inverse.results[0].info
    res["lissa_info"] = {k: info[k] for k in ("scale", "depth", "predicted_bias")}

    for name, p in preds.items():
        res["methods"][name] = stats(p, actual, preds["dense"])
        log(f"  {name:30s} {res['methods'][name]}")
    res.update(pydvl_cg(model, Xtr, ytr, test, lam, dense, idx, actual, log))
    res.update(kronfluence_ekfac(model, Xtr, ytr, test, lam, dense, idx, actual, log))
    return res


def pydvl_cg(model, Xtr, ytr, test, lam, dense, idx, actual, log):
    try:
        from pydvl.influence.torch import CgInfluence
        from torch.utils.data import DataLoader, TensorDataset
    except ImportError as err:
        return {"pydvl": f"not available: {err}"}

    def run():
        m = CgInfluence(model, nn.functional.cross_entropy, regularization=lam)
        m = m.fit(DataLoader(TensorDataset(Xtr, ytr), batch_size=256))
        return m.influences(test[0], test[1], Xtr, ytr, mode="up")[0]

    s, sec = timed(run)
    c = float(s @ dense / (dense @ dense))  # pydvl's convention: a multiple of ours
    out = stats(s[idx] / c, actual, dense[idx])
    out["scale_vs_ours"] = round(c, 3)
    out["time_s"] = sec
    log(f"  pydvl CgInfluence (defaults)    {out}")
    return {"pydvl_cg": out}


def kronfluence_ekfac(model, Xtr, ytr, test, lam, dense, idx, actual, log):
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
    except ImportError as err:
        return {"kronfluence": f"not available: {err}"}
    from _scale_influence import kronfluence_task
    from torch.utils.data import TensorDataset

    def run():
        net = nn.Sequential(nn.Linear(64, 10))  # kronfluence needs a wrapped layer
        net[0].load_state_dict(model.state_dict())
        task = kronfluence_task()
        net = prepare_model(net, task)
        with tempfile.TemporaryDirectory() as tmp:
            an = Analyzer(
                analysis_name="digits",
                model=net,
                task=task,
                output_dir=tmp,
                disable_model_save=True,
                cpu=True,
                disable_tqdm=True,
            )
            fa = FactorArguments(
                strategy="ekfac",
                use_empirical_fisher=False,
                amp_dtype=None,
                activation_covariance_dtype=torch.float64,
                gradient_covariance_dtype=torch.float64,
                eigendecomposition_dtype=torch.float64,
                lambda_dtype=torch.float64,
            )
            an.fit_all_factors(
                factors_name="f",
                dataset=TensorDataset(Xtr, ytr),
                per_device_batch_size=256,
                factor_args=fa,
                overwrite_output_dir=True,
            )
            sa = ScoreArguments(
                damping_factor=lam,
                score_dtype=torch.float64,
                per_sample_gradient_dtype=torch.float64,
                precondition_dtype=torch.float64,
            )
            an.compute_pairwise_scores(
                scores_name="s",
                factors_name="f",
                query_dataset=TensorDataset(*test),
                train_dataset=TensorDataset(Xtr, ytr),
                per_device_query_batch_size=1,
                per_device_train_batch_size=256,
                score_args=sa,
                overwrite_output_dir=True,
            )
            return an.load_pairwise_scores("s")["all_modules"][0].double()

    try:
        s, sec = timed(run)
    except Exception as err:  # report, do not hide
        log(f"  kronfluence failed: {type(err).__name__}: {str(err)[:300]}")
        return {"kronfluence": f"failed: {type(err).__name__}: {str(err)[:300]}"}
    c = float(s @ dense / (dense @ dense))
    out = stats(s[idx] / c, actual, dense[idx])
    out["scale_vs_ours"] = round(c, 3)
    out["time_s"] = sec
    log(f"  kronfluence EK-FAC              {out}")
    return {"kronfluence_ekfac": out}


# ------------------------------------------------------------------------ non-convex
def mlp_init(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def fit_lbfgs(model, X, y, w, lam, tol=1e-9, max_iter=4000):
    params = list(model.parameters())
    n = X.shape[0]
    opt = torch.optim.LBFGS(
        params,
        lr=1,
        max_iter=max_iter,
        tolerance_grad=tol * 1e-2,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        ce = nn.functional.cross_entropy(model(X), y, reduction="none")
        loss = (w * ce).sum() / n + 0.5 * lam * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
        closure()
        gn = float(torch.cat([p.grad.reshape(-1) for p in params]).norm())
        if gn < tol:
            break
    return gn


def nonconvex(lam, top, Xtr, ytr, Xte, yte, log):
    n = Xtr.shape[0]
    ones = torch.ones(n)
    model = mlp_init()
    gn = fit_lbfgs(model, Xtr, ytr, ones, lam)
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(Xte), yte, reduction="none")
    t = int(losses.argmax())
    test = (Xte[t : t + 1], yte[t : t + 1])
    base_loss = float(losses[t])
    log(f"MLP lambda={lam}: ||grad|| = {gn:.1e}; test point {t}, loss {base_loss:.3f}")
    loss_fn = nn.CrossEntropyLoss()
    res = {"lambda": lam, "train_grad_norm": gn, "test_point": t, "methods": {}, "times_s": {}}
    preds = {}
    for curv in ("hessian", "ggn", "ekfac"):
        inf = second.Influence(
            model,
            loss_fn,
            (Xtr, ytr),
            curvature=curv,
            method="dense" if curv != "ekfac" else "auto",
            damping=lam,
            progressbar=False,
        )
        preds[curv], res["times_s"][curv] = timed(lambda inf=inf: inf.scores(test)[0])
        if curv == "hessian":
            res["hessian_min_eigenvalue"] = float(inf.inverse.eigenvalues.min())
            hess_inf = inf
    idx = torch.argsort(preds["hessian"].abs(), descending=True)[:top]
    preds = {k: v[idx] for k, v in preds.items()}
    preds["newton_loo (hessian)"] = hess_inf.newton_loo(test, idx)[0]
    actual, gmax = [], 0.0
    for j in idx.tolist():
        w = ones.clone()
        w[j] = 0
        m = mlp_init()
        gmax = max(gmax, fit_lbfgs(m, Xtr, ytr, w, lam))
        with torch.no_grad():
            actual.append(float(nn.functional.cross_entropy(m(test[0]), test[1])) - base_loss)
    actual = torch.tensor(actual)
    res["loo_max_grad_norm"] = gmax
    log(f"  {top} retrains from the same init, max ||grad|| = {gmax:.1e}")
    for name, p in preds.items():
        res["methods"][name] = stats(p, actual, preds["hessian"])
        log(f"  {name:30s} {res['methods'][name]}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=50)
    ap.add_argument("--mlp-top", type=int, default=20)
    ap.add_argument("--mlp-lambda", type=float, default=1e-2)
    ap.add_argument("--out", default="bench-output/influence.json")
    ap.add_argument("--skip-nonconvex", action="store_true", help="only the convex (softmax) part")
    args = ap.parse_args()
    Xtr, ytr, Xte, yte = digits()
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(
        f"digits: {Xtr.shape[0]} train, {Xte.shape[0]} test; torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}"
    )
    out = {"convex": [convex(lam, args.top, Xtr, ytr, Xte, yte, log) for lam in (1e-2, 1e-3)]}
    if not args.skip_nonconvex:
        out["nonconvex"] = nonconvex(args.mlp_lambda, args.mlp_top, Xtr, ytr, Xte, yte, log)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=lambda o: o if math.isfinite(o) else str(o))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
