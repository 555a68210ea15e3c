"""second.laplace against laplace-torch on a digits MLP, with rotated digits as a shift.

Run (one thread, as the BENCHMARKS figures were measured):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_laplace.py [--skip-diag] [--out bench-output]

Model: an MLP 64-128-128-10 (tanh, 26,122 parameters) trained with Adam on 1,257 sklearn
digits (float64, so the two libraries' log marginal likelihoods can be compared to 1e-5).
Reported: fit time, LML at prior precision 1, optimised precision and LML, predictive time
and peak memory (resident set sampled every 5 ms above the level before the call), MC
accuracy, and NLL/ECE of each predictive on the 540 test digits rotated by 0-90 degrees.
Reliability diagrams go to ``--out``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from second.laplace import Laplace, ece, nll


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


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn):
    """``(result, seconds, peak resident-set increase in bytes)``."""
    base, peak, stop = _rss(), [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.005)

    t = threading.Thread(target=poll)
    t.start()
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        elapsed = time.perf_counter() - start
        stop.set()
        t.join()
    return out, elapsed, max(0, max(peak[0], _rss()) - base)


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


def train(Xtr, ytr, epochs=300, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
    ).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(Xtr, ytr), batch_size=64, shuffle=True
    )
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model.eval()


def row(name, *cells):
    print("| " + " | ".join([name, *[str(c) for c in cells]]) + " |", flush=True)


def scores(probs, y):
    acc = float((probs.argmax(1) == y).double().mean())
    return float(nll(probs, y)), float(ece(probs, y)), acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-output")
    ap.add_argument("--skip-diag", action="store_true", help="skip the all-layer diagonal fits")
    ap.add_argument("--skip-lt", action="store_true", help="skip laplace-torch")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    Xtr, ytr, shifted, yte = digits()
    model = train(Xtr, ytr)
    P = sum(p.numel() for p in model.parameters())
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(Xtr, ytr), batch_size=128, shuffle=False
    )
    Xte = shifted[0]
    with torch.no_grad():
        map_probs = torch.softmax(model(Xte), 1)
    m_nll, m_ece, m_acc = scores(map_probs, yte)
    print(f"digits MLP: {P} parameters, {len(ytr)} training points, float64, 1 thread")
    print(f"MAP: NLL {m_nll:.4f}, ECE {m_ece:.4f}, accuracy {m_acc:.4f}\n")
    lt = None if args.skip_lt else _import_laplace_torch()
    CE = nn.CrossEntropyLoss()
    one = torch.tensor(1.0, dtype=torch.float64)

    row("configuration", "laplace-torch 0.3", "second.laplace")
    row("---", "---", "---")

    # -- last-layer full GGN ---------------------------------------------------------------
    la_s, t_s, _ = measure(lambda: Laplace(model, CE, loader, subset="last_layer"))
    lml_s = float(la_s.log_marginal_likelihood(1.0))
    if lt:

        def fit_lt():
            la = lt.Laplace(
                model, "classification", subset_of_weights="last_layer", hessian_structure="full"
            )
            la.fit(loader)
            return la

        la_t, t_t, _ = measure(fit_lt)
        lml_t = float(la_t.log_marginal_likelihood(prior_precision=one))
        row(
            "last-layer full GGN: LML at prior precision 1 (fit time)",
            f"{lml_t:.5f} ({t_t:.2f} s)",
            f"{lml_s:.5f} ({t_s:.2f} s); relative difference {abs(lml_s - lml_t) / abs(lml_t):.1e}",
        )
        _, t_ot, _ = measure(lambda: la_t.optimize_prior_precision(pred_type="glm"))
        lt_prior = float(la_t.prior_precision)
        lt_lml = float(la_t.log_marginal_likelihood())
    else:
        row(
            "last-layer full GGN: LML at prior precision 1 (fit time)",
            "-",
            f"{lml_s:.5f} ({t_s:.2f} s)",
        )
    res_m, t_m, _ = measure(lambda: la_s.optimize_prior_precision("mackay"))
    res_g, t_g, _ = measure(lambda: la_s.optimize_prior_precision("gradient"))
    ours = (
        f"MacKay {float(res_m.prior_precision):.4f} / {res_m.log_marginal_likelihood:.4f} "
        f"({t_m * 1e3:.1f} ms, {res_m.iterations} updates); gradient "
        f"{float(res_g.prior_precision):.4f} / {res_g.log_marginal_likelihood:.4f} ({t_g * 1e3:.1f} ms)"
    )
    if lt:
        row(
            "last-layer full: optimised prior precision / LML (time)",
            f"{lt_prior:.4f} / {lt_lml:.4f} ({t_ot:.2f} s, 100 Adam steps)",
            ours,
        )
    else:
        row("last-layer full: optimised prior precision / LML (time)", "-", ours)

    # -- all-layer KFAC --------------------------------------------------------------------
    kf_s, t_ks, _ = measure(lambda: Laplace(model, CE, loader, structure="kfac"))
    lml_ks = float(kf_s.log_marginal_likelihood(1.0))
    res_k, t_kopt, _ = measure(lambda: kf_s.optimize_prior_precision("mackay"))
    if lt:

        def fit_kt():
            la = lt.Laplace(
                model, "classification", subset_of_weights="all", hessian_structure="kron"
            )
            la.fit(loader)
            return la

        kf_t, t_kt, _ = measure(fit_kt)
        lml_kt = float(kf_t.log_marginal_likelihood(prior_precision=one))
        _, t_kot, _ = measure(lambda: kf_t.optimize_prior_precision(pred_type="glm"))
        row(
            "all-layer KFAC: LML at 1, optimised precision (fit time)",
            f"{lml_kt:.4f}, {float(kf_t.prior_precision):.4f} ({t_kt:.3f} s; optimisation {t_kot:.2f} s)",
            f"{lml_ks:.4f}, {float(res_k.prior_precision):.4f} ({t_ks:.3f} s; MacKay {t_kopt * 1e3:.1f} ms)",
        )
    else:
        row(
            "all-layer KFAC: LML at 1, optimised precision (fit time)",
            "-",
            f"{lml_ks:.4f}, {float(res_k.prior_precision):.4f} ({t_ks:.3f} s)",
        )
    pk_s, tp_s, mem_s = measure(lambda: kf_s.predict(Xte, link="probit"))
    if lt:
        pk_t, tp_t, mem_t = measure(lambda: kf_t(Xte, pred_type="glm", link_approx="probit"))
        row(
            f"all-layer KFAC: probit predictive on {len(yte)} test points (time, peak memory)",
            f"{tp_t:.2f} s, +{mem_t / 2**20:.0f} MB",
            f"{tp_s:.2f} s, +{mem_s / 2**20:.0f} MB ({tp_t / tp_s:.1f}x faster, "
            f"{mem_t / max(mem_s, 1):.1f}x less memory)",
        )
    else:
        row(
            "all-layer KFAC: probit predictive (time, peak memory)",
            "-",
            f"{tp_s:.2f} s, +{mem_s / 2**20:.0f} MB",
        )
    g = torch.Generator().manual_seed(0)
    pn_s, tn_s, _ = measure(lambda: kf_s.predict(Xte, pred="nn", n_samples=100, generator=g))
    acc_s = scores(pn_s, yte)[2]
    if lt:
        torch.manual_seed(0)
        pn_t, tn_t, _ = measure(lambda: kf_t(Xte, pred_type="nn", link_approx="mc", n_samples=100))
        row(
            "all-layer KFAC: MC sampling (network) accuracy at the optimised precision (time)",
            f"{scores(pn_t, yte)[2]:.3f} ({tn_t:.2f} s)",
            f"{acc_s:.3f} ({tn_s:.2f} s)",
        )

    # -- all-layer diagonal ------------------------------------------------------------------
    if not args.skip_diag:
        dg_s, td_s, _ = measure(lambda: Laplace(model, CE, loader, structure="diag"))
        cell_s = f"{td_s:.2f} s, LML at 1 {float(dg_s.log_marginal_likelihood(1.0)):.4f}"
        if lt:

            def fit_dt():
                la = lt.Laplace(
                    model, "classification", subset_of_weights="all", hessian_structure="diag"
                )
                la.fit(loader)
                return la

            dg_t, td_t, _ = measure(fit_dt)
            row(
                "all-layer diagonal GGN: fit time, LML at 1",
                f"{td_t:.2f} s, LML at 1 {float(dg_t.log_marginal_likelihood(prior_precision=one)):.4f}",
                cell_s,
            )
        else:
            row("all-layer diagonal GGN: fit time, LML at 1", "-", cell_s)

    # -- rotated digits ----------------------------------------------------------------------
    print("\nNLL / ECE on the test digits rotated by each angle (lower is better)\n")
    predictives = {
        "MAP": lambda X: torch.softmax(model(X), 1).detach(),
        "second last-layer full, GLM probit": lambda X: la_s.predict(X),
        "second all-layer KFAC, GLM probit": lambda X: kf_s.predict(X),
        "second all-layer KFAC, GLM bridge": lambda X: kf_s.predict(X, link="bridge"),
    }
    if lt:
        predictives["laplace-torch last-layer full, GLM probit"] = lambda X: la_t(
            X, pred_type="glm"
        )
        predictives["laplace-torch all-layer KFAC, GLM probit"] = lambda X: kf_t(X, pred_type="glm")
    angles = sorted(shifted)
    row("predictive", *[f"{a} deg" for a in angles])
    row("---", *["---"] * len(angles))
    table = {}
    for name, fn in predictives.items():
        cells = []
        for a in angles:
            p = fn(shifted[a]).detach()
            table[(name, a)] = p
            n_, e_, _ = scores(p, yte)
            cells.append(f"{n_:.3f} / {e_:.3f}")
        row(name, *cells)
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
