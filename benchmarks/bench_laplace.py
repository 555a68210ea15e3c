"""second.laplace against laplace-torch on a digits MLP, with rotated digits as a shift.

Run (one thread, as the BENCHMARKS figures were measured):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_laplace.py [--skip-diag] [--skip-lt]
        [--seeds 3] [--runs 5] [--out bench-output]

Model: an MLP 64-128-128-10 (tanh, 26,122 parameters) trained with Adam on 1,257 sklearn
digits (float64, so the two libraries' log marginal likelihoods can be compared to 1e-5).
Reported beside laplace-torch: fit time, LML at prior precision 1, optimised precision and
LML, the all-layer KFAC predictive's CPU time (this thread's), wall time and peak memory
(resident set sampled every 5 ms above the level before the call; second's: the median of
``--runs``; laplace-torch's: one run, as it needs ~15 GB, on 180 test points instead of
540 when less than 17 GB is available), and MC accuracy. Then NLL/ECE of each predictive
on the 540 test digits rotated by 0-90 degrees, for MAPs trained two ways (a fixed weight
decay; the marginal likelihood's prior, tuned during training by ``OnlinePrior``) and
``--seeds`` seeds, with a summary of the issue's two calibration targets. Reliability
diagrams go to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from _measure import rss
from torch import nn

from second.laplace import Laplace, OnlinePrior, ece, nll


def _import_laplace_torch():
    # laplace-torch imports torchmetrics, which imports a torchvision built for another torch
    # when one is installed; the metrics it needs do not use torchvision
    try:
        import lightning_utilities.core.imports as li

        orig = li.RequirementCache.__bool__
        li.RequirementCache.__bool__ = lambda self: (
            False if "torchvision" in str(self.requirement) else orig(self)
        )
        sys.modules.setdefault("torchvision", None)
    except ImportError:
        pass
    import laplace

    return laplace


def measure(fn):
    """``(result, wall seconds, CPU seconds of this thread, peak resident-set increase in bytes)``."""
    base, peak, stop = rss(), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    t = threading.Thread(target=poll)
    t.start()
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        out = fn()
    finally:
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
        stop.set()
        t.join()
    return out, elapsed, cpu, max(0, max(peak[0], rss()) - base)


def repeat(fn, runs):
    """``(result, median wall s, median CPU s, largest peak)`` over ``runs`` calls."""
    got = [measure(fn) for _ in range(runs)]
    return (
        got[-1][0],
        statistics.median(g[1] for g in got),
        statistics.median(g[2] for g in got),
        max(g[3] for g in got),
    )


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def digits():
    from scipy.ndimage import rotate
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = d.images / 16.0
    Xtr, Xte, ytr, yte = train_test_split(X, d.target, test_size=0.3, random_state=0)

    def flat(a):
        return torch.tensor(a.reshape(len(a), -1), dtype=torch.float64)

    shifted = {
        angle: flat(np.stack([rotate(im, angle, reshape=False, order=1) for im in Xte]))
        for angle in (15, 30, 45, 60, 75, 90)
    }
    shifted[0] = flat(Xte)
    return flat(Xtr), torch.tensor(ytr), shifted, torch.tensor(yte)


def _mlp():
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).double()


def train(Xtr, ytr, epochs=300, seed=0, online=False):
    """Adam on the mean cross-entropy, 300 epochs of batches of 64.

    ``online=False``: a fixed weight decay ``1e-4`` (prior precision ``1e-4 N`` = 0.126).
    ``online=True``: no weight decay; the prior precision is the marginal likelihood's
    (``OnlinePrior``: all-layer KFAC, scalar, MacKay, every 5 epochs after 10), and its
    negative log prior ``/ N`` is added to the loss. Returns ``(model, prior precision)``.
    """
    torch.manual_seed(seed)
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0 if online else 1e-4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(Xtr, ytr), batch_size=64, shuffle=True
    )
    N = len(ytr)
    prior = None
    if online:
        full = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(Xtr, ytr), batch_size=128, shuffle=False
        )
        spe = len(loader)
        prior = OnlinePrior(opt, model, nn.CrossEntropyLoss(), full, every=5 * spe, burnin=10 * spe)
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            if prior is not None:
                loss = loss + prior.penalty() / N
            loss.backward()
            opt.step()
    if prior is None:
        return model.eval(), torch.tensor(1e-4 * N, dtype=torch.float64)
    prior.remove()
    return model.eval(), prior.prior_precision


def row(name, *cells):
    print("| " + " | ".join([name, *[str(c) for c in cells]]) + " |", flush=True)


def scores(probs, y):
    acc = float((probs.argmax(1) == y).double().mean())
    return float(nll(probs, y)), float(ece(probs, y)), acc


def comparison(args, model, loader, Xte, yte, lt):
    """second.laplace beside laplace-torch on the weight-decay MAP (seed 0)."""
    CE = nn.CrossEntropyLoss()
    one = torch.tensor(1.0, dtype=torch.float64)
    row("configuration", "laplace-torch 0.3", "second.laplace")
    row("---", "---", "---")

    # -- last-layer full GGN ---------------------------------------------------------------
    la_s, t_s, c_s, _ = measure(lambda: Laplace(model, CE, loader, subset="last_layer"))
    lml_s = float(la_s.log_marginal_likelihood(1.0))
    la_t = None
    if lt:

        def fit_lt():
            la = lt.Laplace(
                model, "classification", subset_of_weights="last_layer", hessian_structure="full"
            )
            la.fit(loader)
            return la

        la_t, t_t, c_t, _ = measure(fit_lt)
        lml_t = float(la_t.log_marginal_likelihood(prior_precision=one))
        row(
            "last-layer full GGN: LML at prior precision 1 (fit: CPU s)",
            f"{lml_t:.5f} ({c_t:.2f} s)",
            f"{lml_s:.5f} ({c_s:.2f} s); relative difference {abs(lml_s - lml_t) / abs(lml_t):.1e}",
        )
        _, _, c_ot, _ = measure(lambda: la_t.optimize_prior_precision(pred_type="glm"))
        lt_prior = float(la_t.prior_precision)
        lt_lml = float(la_t.log_marginal_likelihood())
    else:
        row(
            "last-layer full GGN: LML at prior precision 1 (fit: CPU s)",
            "-",
            f"{lml_s:.5f} ({c_s:.2f} s)",
        )
    res_m, _, c_m, _ = measure(lambda: la_s.optimize_prior_precision("mackay"))
    res_g, _, c_g, _ = measure(lambda: la_s.optimize_prior_precision("gradient"))
    ours = (
        f"MacKay {float(res_m.prior_precision):.4f} / {res_m.log_marginal_likelihood:.4f} "
        f"({c_m * 1e3:.1f} ms, {res_m.iterations} updates); gradient "
        f"{float(res_g.prior_precision):.4f} / {res_g.log_marginal_likelihood:.4f} ({c_g * 1e3:.1f} ms)"
    )
    theirs = f"{lt_prior:.4f} / {lt_lml:.4f} ({c_ot:.2f} s, 100 Adam steps)" if lt else "-"
    row("last-layer full: optimised prior precision / LML (CPU time)", theirs, ours)

    # -- all-layer KFAC --------------------------------------------------------------------
    kf_s, _, c_ks, _ = measure(lambda: Laplace(model, CE, loader, subset="all", structure="kfac"))
    lml_ks = float(kf_s.log_marginal_likelihood(1.0))
    res_k, _, c_kopt, _ = measure(lambda: kf_s.optimize_prior_precision("mackay"))
    kf_t = None
    ours = f"{lml_ks:.4f}, {float(res_k.prior_precision):.4f} ({c_ks:.3f} s; MacKay {c_kopt * 1e3:.1f} ms)"
    if lt:

        def fit_kt():
            la = lt.Laplace(
                model, "classification", subset_of_weights="all", hessian_structure="kron"
            )
            la.fit(loader)
            return la

        kf_t, _, c_kt, _ = measure(fit_kt)
        lml_kt = float(kf_t.log_marginal_likelihood(prior_precision=one))
        _, _, c_kot, _ = measure(lambda: kf_t.optimize_prior_precision(pred_type="glm"))
        theirs = f"{lml_kt:.4f}, {float(kf_t.prior_precision):.4f} ({c_kt:.3f} s; optimisation {c_kot:.2f} s)"
    else:
        theirs = "-"
    row("all-layer KFAC: LML at 1, optimised precision (fit: CPU s)", theirs, ours)

    # the predictive: laplace-torch's needs ~15 GB on 540 points; fewer points if less is free
    free = available_gb()
    n_pred = len(yte) if free >= 17 or not lt else 180
    Xp = Xte[:n_pred]
    _, tp_s, cp_s, mem_s = repeat(lambda: kf_s.predict(Xp, link="probit"), args.runs)
    label = (
        f"all-layer KFAC: probit predictive on {n_pred} test points (CPU s, wall s, peak memory; "
        f"second: median of {args.runs} runs; {free:.0f} GB available)"
    )
    # below 1 MB the sampled resident set cannot tell (freed blocks are reused)
    small = mem_s < 2**20
    ours = f"{cp_s:.3f} s CPU, {tp_s:.3f} s wall, " + (
        "< 1 MB" if small else f"+{mem_s / 2**20:.0f} MB"
    )
    if lt:
        _, tp_t, cp_t, mem_t = measure(lambda: kf_t(Xp, pred_type="glm", link_approx="probit"))
        mem_ratio = f"{'> ' if small else ''}{mem_t / max(mem_s, 2**20):.0f}x"
        ours += (
            f" ({cp_t / cp_s:.0f}x less CPU, {tp_t / tp_s:.0f}x faster, {mem_ratio} less memory)"
        )
        row(label, f"{cp_t:.2f} s CPU, {tp_t:.2f} s wall, +{mem_t / 2**20:.0f} MB", ours)
    else:
        row(label, "-", ours)
    g = torch.Generator().manual_seed(0)
    pn_s, _, cn_s, _ = measure(lambda: kf_s.predict(Xte, pred="nn", n_samples=100, generator=g))
    theirs = "-"
    if lt:
        torch.manual_seed(0)
        pn_t, _, cn_t, _ = measure(
            lambda: kf_t(Xte, pred_type="nn", link_approx="mc", n_samples=100)
        )
        theirs = f"{scores(pn_t, yte)[2]:.3f} ({cn_t:.2f} s)"
    row(
        "all-layer KFAC: MC sampling (network) accuracy at the optimised precision (CPU s)",
        theirs,
        f"{scores(pn_s, yte)[2]:.3f} ({cn_s:.2f} s)",
    )

    # -- all-layer diagonal ------------------------------------------------------------------
    if not args.skip_diag:
        dg_s, _, cd_s, _ = measure(
            lambda: Laplace(model, CE, loader, subset="all", structure="diag")
        )
        ours = f"{cd_s:.2f} s, LML at 1 {float(dg_s.log_marginal_likelihood(1.0)):.4f}"
        theirs = "-"
        if lt:

            def fit_dt():
                la = lt.Laplace(
                    model, "classification", subset_of_weights="all", hessian_structure="diag"
                )
                la.fit(loader)
                return la

            dg_t, _, cd_t, _ = measure(fit_dt)
            lml = float(dg_t.log_marginal_likelihood(prior_precision=one))
            theirs = f"{cd_t:.2f} s, LML at 1 {lml:.4f}"
        row("all-layer diagonal GGN: fit CPU time, LML at 1", theirs, ours)
    return la_s, kf_s, la_t


def predictives(model, delta, loader, online):
    """The configurations compared under rotation, for one trained MAP."""
    CE = nn.CrossEntropyLoss()
    out = {"MAP": lambda X: torch.softmax(model(X), 1).detach()}
    ll = Laplace(model, CE, loader, subset="last_layer", structure="full")
    kf = Laplace(model, CE, loader, subset="all", structure="kfac")
    if online:  # the prior the network was trained with (the marginal likelihood's)
        ll.prior_precision = delta
        kf.prior_precision = delta
        pre = "prior of training"
        out[f"last-layer full, {pre}, probit_centered"] = lambda X: ll.predict(X)
        out[f"last-layer full, {pre}, probit"] = lambda X: ll.predict(X, link="probit")
        g = torch.Generator().manual_seed(0)
        out[f"last-layer full, {pre}, MC 1000 (exact GLM)"] = lambda X: ll.predict(
            X, link="mc", n_samples=1000, generator=g
        )
        out[f"all-layer KFAC, {pre}, probit_centered"] = lambda X: kf.predict(X)
        out[f"all-layer KFAC, {pre}, bridge"] = lambda X: kf.predict(X, link="bridge")
        ll2 = Laplace(model, CE, loader, subset="last_layer", structure="full")
        ll2.optimize_prior_precision()
        out["last-layer full, MacKay after training, probit_centered"] = lambda X: ll2.predict(X)
        return out
    ll.optimize_prior_precision()
    kf.optimize_prior_precision()
    out["last-layer full, MacKay, probit"] = lambda X: ll.predict(X, link="probit")
    out["last-layer full, MacKay, probit_centered"] = lambda X: ll.predict(X)
    out["all-layer KFAC, MacKay, probit"] = lambda X: kf.predict(X, link="probit")
    out["all-layer KFAC, MacKay, probit_centered"] = lambda X: kf.predict(X)
    out["all-layer KFAC, MacKay, bridge"] = lambda X: kf.predict(X, link="bridge")
    return out


PLOTTED = (
    "MAP",
    "last-layer full, MacKay, probit",
    "last-layer full, prior of training, probit_centered",
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-output")
    ap.add_argument("--skip-diag", action="store_true", help="skip the all-layer diagonal fits")
    ap.add_argument("--skip-lt", action="store_true", help="skip laplace-torch")
    ap.add_argument("--seeds", type=int, default=3, help="trainings (seeds) under rotation")
    ap.add_argument("--runs", type=int, default=5, help="runs of second's KFAC predictive")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    Xtr, ytr, shifted, yte = digits()
    model, _ = train(Xtr, ytr)
    P = sum(p.numel() for p in model.parameters())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(Xtr, ytr), batch_size=128, shuffle=False
    )
    Xte = shifted[0]
    with torch.no_grad():
        m_nll, m_ece, m_acc = scores(torch.softmax(model(Xte), 1), yte)
    print(f"digits MLP: {P} parameters, {len(ytr)} training points, float64, 1 thread")
    print(
        f"MAP (weight decay 1e-4, seed 0): NLL {m_nll:.4f}, ECE {m_ece:.4f}, accuracy {m_acc:.4f}\n"
    )
    lt = None if args.skip_lt else _import_laplace_torch()
    la_s, kf_s, la_t = comparison(args, model, loader, Xte, yte, lt)

    # -- rotated digits ----------------------------------------------------------------------
    angles = sorted(shifted)
    summary: dict[str, list] = {}
    table = {}
    for seed in range(args.seeds):
        for online in (False, True):
            m, delta = train(Xtr, ytr, seed=seed, online=online)
            kind = "MAP+OnlinePrior" if online else "MAP weight decay 1e-4"
            preds = predictives(m, delta, loader, online)
            if seed == 0 and not online and la_t is not None:
                preds["laplace-torch last-layer full, GLM probit"] = lambda X: la_t(
                    X, pred_type="glm"
                )
            if seed == 0:
                print(
                    f"\nSeed 0, {kind} (prior precision {float(delta):.3f}): NLL / ECE by rotation\n"
                )
                row("predictive", *[f"{a} deg" for a in angles])
                row("---", *["---"] * len(angles))
            base = None
            for name, fn in preds.items():
                nlls, cells = [], []
                for a in angles:
                    p = fn(shifted[a]).detach()
                    n_, e_, _ = scores(p, yte)
                    nlls.append(n_)
                    cells.append(f"{n_:.3f} / {e_:.3f}")
                    if seed == 0 and a in (0, 45, 90) and name in PLOTTED:
                        table[(f"{kind}: {name}", a)] = p
                if seed == 0:
                    row(name, *cells)
                if name == "MAP":
                    base = nlls
                    continue
                in_ratio = nlls[0] / base[0]
                shift = [x / b for x, b, a in zip(nlls, base, angles) if a >= 30]
                lowers = max(shift) < 1.0
                summary.setdefault(f"{kind}: {name}", []).append(
                    (in_ratio, lowers, statistics.mean(shift))
                )
    print(f"\nAcross {args.seeds} trainings (seeds): in-distribution NLL / MAP's; whether the")
    print("NLL is below MAP's at every rotation of 30 degrees or more; the mean of NLL / MAP's")
    print("over those rotations and seeds (the lowest of the rows meeting both targets wins)\n")
    row(
        "configuration",
        "in-distribution NLL / MAP (per seed)",
        "lower at every >= 30 deg",
        "mean NLL / MAP at >= 30 deg",
        "both targets",
    )
    row("---", "---", "---", "---", "---")
    for name, rs in summary.items():
        ratios = ", ".join(f"{r[0]:.3f}" for r in rs)
        low = all(r[1] for r in rs)
        both = low and all(r[0] <= 1.10 for r in rs)
        gain = statistics.mean(r[2] for r in rs)
        row(name, ratios, "yes" if low else "no", f"{gain:.3f}", "yes" if both else "no")
    _plot(table, yte, angles, out)


def _plot(table, y, angles, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no reliability diagrams")
        return
    from second.laplace import reliability

    names = sorted({k[0] for k in table})
    for a in (0, 45, 90):
        if a not in angles:
            continue
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot([0, 1], [0, 1], "k:", label="calibrated")
        for name in names:
            conf, acc, counts = reliability(table[(name, a)], y, n_bins=10)
            keep = counts > 0
            ax.plot(conf[keep].numpy(), acc[keep].numpy(), "o-", label=name, ms=3)
        ax.set(xlabel="confidence", ylabel="accuracy", title=f"digits rotated by {a} degrees")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"laplace_reliability_{a}.png", dpi=120)
        plt.close(fig)
    print(f"\nreliability diagrams in {out}/laplace_reliability_*.png")


if __name__ == "__main__":
    main()
