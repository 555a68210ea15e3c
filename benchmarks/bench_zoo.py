"""The workload zoo: every optimizer with its DEFAULT settings on models it was not tuned on.

Models (all offline): scikit-learn digits classifiers (MLP 64-64-10 with ReLU, GELU and Tanh;
a CNN conv 1->16, conv 16->32, max-pool, linear, ReLU), the digits autoencoder of
bench_kfac.py, a character-level transformer LM (2 layers, d_model 64, 4 heads, context 64,
``nn.TransformerEncoder`` with a causal mask, so ``F.scaled_dot_product_attention``) trained on
the Python standard library's own sources, and a wide MLP of 1.1M parameters on digits.

Optimizers: second's (``second.optim.KFAC`` and any of ``SOAP``, ``Shampoo``, ``Sophia``,
``SophiaH``, ``AdaHessian`` that exist), each built with defaults only, against AdamW with a
learning-rate grid (the best per model is reported as "tuned"), and, where installed (the
``bench-zoo`` extra), heavyball SOAP / PSGDKron and pytorch-optimizer SophiaH / AdaHessian.

Every run uses torch.optim's closure contract (zero_grad, loss, backward, return loss), the
same initialization and batch order. Measured: loss against steps and against CPU-seconds of
the training thread (``time.thread_time``, evaluation excluded), wall time, test accuracy or
validation loss, whether any loss went non-finite, the optimizer's refused-step counters, and
the median step cost relative to Adam. The same models with dropout (``mlp-relu-dropout``,
``mlp-gelu-dropout``, ``cnn-dropout``, ``char-transformer-dropout``) run when named in
``--models``. One JSON line per run, a Markdown table, and plots
in ``bench-output/zoo_*.png``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_zoo.py [--quick] [--models ...]
        [--optimizers ...] [--epochs 5] [--lm-steps 400] [--seeds 0] [--cpu-budget S]

``--cpu-budget S`` trains the character LMs for S CPU-seconds each instead of a number of
steps: the comparison at equal CPU time (the table's last loss column is then the final
training loss at the budget, "final" the validation loss).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import second.optim
from second.func import differentiable_attention

torch.set_num_threads(1)
OUT = Path("bench-output")
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
TARGET_ACCURACY = 0.97  # the digits CNN target of issue 14 (checked after every step, untimed)


# ----------------------------------------------------------------------------- data
def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16
    y = torch.tensor(d.target)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(1234))
    X, y = X[perm], y[perm]
    n_test = 360
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test])


def stdlib_text(max_bytes: int = 1_500_000) -> torch.Tensor:
    """Bytes of the Python standard library's own sources (ships with every Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.tensor(list(b"".join(chunks)[:max_bytes]), dtype=torch.long)


# ----------------------------------------------------------------------------- models
class CNN(nn.Module):
    """``dropout``: before the linear layer (the zoo's CNN has none)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 10)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = torch.relu(self.c1(x.view(-1, 1, 8, 8)))
        x = nn.functional.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc(self.drop(x.flatten(1)))


class CharLM(nn.Module):
    """``classes_first``: logits ``[B, vocab, T]`` for ``CrossEntropyLoss`` as they are; else
    ``[B, T, vocab]``, the common layout, with the loss on ``out.reshape(-1, vocab)``."""

    def __init__(
        self, vocab=256, d=64, heads=4, layers=2, context=64, classes_first=True, dropout=0.0
    ):
        super().__init__()
        self.classes_first = classes_first
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(context, d))
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=dropout, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, idx):
        T = idx.shape[1]
        h = self.emb(idx) + self.pos[:T]
        h = self.enc(h, mask=self.mask[:T, :T], is_causal=True)
        logits = self.head(self.norm(h))
        return logits.transpose(1, 2) if self.classes_first else logits


def autoencoder():
    sizes = [64, 128, 32, 8, 32, 128, 64]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        layers.append(nn.Tanh() if i < len(sizes) - 2 else nn.Sigmoid())
    return nn.Sequential(*layers)


def mlp(act):
    return lambda: nn.Sequential(nn.Linear(64, 64), act(), nn.Linear(64, 10))


MODELS: dict[str, dict] = {
    "mlp-relu": dict(make=mlp(nn.ReLU), kind="classify"),
    "mlp-gelu": dict(make=mlp(nn.GELU), kind="classify"),
    "mlp-tanh": dict(make=mlp(nn.Tanh), kind="classify"),
    "cnn": dict(make=CNN, kind="classify"),
    "autoencoder": dict(make=autoencoder, kind="autoencode"),
    "wide-mlp-1M": dict(
        make=lambda: nn.Sequential(
            nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10)
        ),
        kind="classify",
    ),
    "char-transformer": dict(make=CharLM, kind="lm"),
    # the same with [B, T, vocab] logits and the loss on a reshaped view (a user's usual code)
    "char-transformer-flat": dict(make=lambda: CharLM(classes_first=False), kind="lm-flat"),
}

# with dropout (random draws in every training forward): run on request (--models ...)
DROPOUT_MODELS: dict[str, dict] = {
    "mlp-relu-dropout": dict(
        make=lambda: nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 10)
        ),
        kind="classify",
    ),
    "mlp-gelu-dropout": dict(
        make=lambda: nn.Sequential(
            nn.Linear(64, 128),
            nn.GELU(),
            nn.Dropout(0.3),
            nn.Linear(128, 64),
            nn.GELU(),
            nn.Dropout(0.3),
            nn.Linear(64, 10),
        ),
        kind="classify",
    ),
    "cnn-dropout": dict(make=lambda: CNN(dropout=0.25), kind="classify"),
    # nn.TransformerEncoderLayer's default dropout, in the attention and the feed-forward
    "char-transformer-dropout": dict(make=lambda: CharLM(dropout=0.1), kind="lm"),
}


# ----------------------------------------------------------------------------- optimizers
SECOND = ("KFAC", "SOAP", "Shampoo", "Sophia", "SophiaH", "AdaHessian")


def second_optimizer(name: str) -> Callable | None:
    cls = getattr(second.optim, name, None)
    if cls is None:
        return None

    def make(model, loss_fn):
        try:
            return cls(model, loss_fn)
        except TypeError:
            return cls(model.parameters())

    return make


def create_graph(make: Callable) -> Callable:
    """Mark an anchor whose closure must call ``loss.backward(create_graph=True)``."""
    make.create_graph = True  # type: ignore[attr-defined]
    return make


def anchors() -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    for lr in ADAM_GRID:
        out[f"AdamW lr={lr:g}"] = lambda m, f, lr=lr: torch.optim.AdamW(m.parameters(), lr=lr)
    try:
        import heavyball

        out["heavyball SOAP"] = lambda m, f: heavyball.SOAP(m.parameters())
        out["heavyball PSGDKron"] = lambda m, f: heavyball.PSGDKron(m.parameters())
    except Exception:  # not installed: the bench-zoo extra
        pass
    try:
        import pytorch_optimizer as po

        # their Hutchinson estimates differentiate the gradient: the closure keeps its graph
        out["pytorch-optimizer SophiaH"] = create_graph(lambda m, f: po.SophiaH(m.parameters()))
        out["pytorch-optimizer AdaHessian"] = create_graph(
            lambda m, f: po.AdaHessian(m.parameters())
        )
    except Exception:
        pass
    return out


# ----------------------------------------------------------------------------- training
@dataclass
class Run:
    model: str
    optimizer: str
    seed: int
    losses: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    wall: float = 0.0
    final: float = math.nan  # test accuracy (classify), test loss (autoencode, lm)
    nonfinite_at: int | None = None
    error: str = ""
    refused: dict = field(default_factory=dict)
    to_target: float | None = None  # CPU-s to TARGET_ACCURACY on the test set (classifiers)
    steps_to_target: int | None = None


def batches(kind, data, seed, epochs, lm_steps, batch_size=128, context=64):
    g = torch.Generator().manual_seed(seed)
    if kind in ("lm", "lm-flat"):
        text = data
        for _ in range(lm_steps):
            start = torch.randint(0, len(text) - context - 1, (32,), generator=g)
            idx = start[:, None] + torch.arange(context + 1)
            chunk = text[idx]
            yield chunk[:, :-1], chunk[:, 1:]
        return
    X, y = data
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X) - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            yield X[idx], (X[idx] if kind == "autoencode" else y[idx])


def loss_of(kind, loss_fn, out, y):
    """The training loss; ``"lm-flat"``: on the logits viewed as ``[B * T, vocab]``."""
    if kind == "lm-flat":
        return loss_fn(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return loss_fn(out, y)


def evaluate(kind, model, test, loss_fn) -> float:
    with torch.no_grad():
        if kind == "classify":
            X, y = test
            return float((model(X).argmax(1) == y).float().mean())
        if kind == "autoencode":
            X, _ = test
            return float(loss_fn(model(X), X))
        Xv, yv = test
        return float(loss_of(kind, loss_fn, model(Xv), yv))


def refused_counters(opt) -> dict:
    """The safeguard counters (Newton types: ``opt._state``; KFAC: ``opt.counters``), nonzero only."""
    st = getattr(opt, "counters", None) or getattr(opt, "_state", None) or {}
    if not isinstance(st, dict):
        return {}
    keys = ("n_rejected", "n_refused", "n_skipped")
    return {k: v for k, v in st.items() if k.startswith(keys) and v}


def train(
    mname, oname, make_opt, seed, epochs, lm_steps, train_data, test_data, cpu_budget=None
) -> Run:
    """One run; ``cpu_budget``: stop once the training thread has spent this many CPU-s."""
    spec = MODELS[mname] if mname in MODELS else DROPOUT_MODELS[mname]
    kind = spec["kind"]
    torch.manual_seed(seed)
    model = spec["make"]()
    loss_fn = nn.MSELoss() if kind == "autoencode" else nn.CrossEntropyLoss()
    run = Run(mname, oname, seed)
    try:
        opt = make_opt(model, loss_fn)
        graph = getattr(make_opt, "create_graph", False)
    except Exception as err:  # a default that cannot even be built is a finding
        run.error = f"cannot be built: {type(err).__name__}: {str(err)[:120]}"
        return run
    cpu = 0.0
    t_wall = time.perf_counter()
    for step, (xb, yb) in enumerate(batches(kind, train_data, seed, epochs, lm_steps)):

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            if graph:  # a double backward: the math attention kernel (the fused ones lack it)
                with differentiable_attention():
                    loss = loss_of(kind, loss_fn, model(xb), yb)
            else:
                loss = loss_of(kind, loss_fn, model(xb), yb)
            loss.backward(create_graph=graph)
            return loss

        t0 = time.thread_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss = opt.step(closure)
        except Exception as err:
            run.error = f"raised at step {step}: {type(err).__name__}: {str(err)[:120]}"
            break
        dt = time.thread_time() - t0
        cpu += dt
        run.step_times.append(dt)
        value = float(loss) if loss is not None else float(loss_of(kind, loss_fn, model(xb), yb))
        run.losses.append(value)
        run.cpu.append(cpu)
        if not math.isfinite(value):
            run.nonfinite_at = step
            break
        if cpu_budget is not None and cpu >= cpu_budget:
            break
        if kind == "classify" and run.to_target is None:
            model.eval()
            if evaluate(kind, model, test_data, loss_fn) >= TARGET_ACCURACY:
                run.to_target, run.steps_to_target = cpu, step + 1
            model.train()
    run.wall = time.perf_counter() - t_wall
    if run.nonfinite_at is None and not run.error:
        run.final = evaluate(kind, model, test_data, loss_fn)
    run.refused = refused_counters(opt)
    close = getattr(opt, "close", None)
    if callable(close):
        close()
    return run


# ----------------------------------------------------------------------------- report
def table(runs: list[Run]) -> str:
    lines = [
        "| model | optimizer | final (acc / loss) | last train loss | CPU s | wall s | "
        f"step cost vs Adam (mean / median) | to {TARGET_ACCURACY:g} (steps, CPU s) | outcome "
        "| refused steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # the mean step (CPU total / steps) counts periodic work (eigendecompositions, damping
    # adaptation) that a median step would hide; the median is shown beside it
    adam_step: dict[str, tuple[float, float]] = {}
    for r in runs:
        if r.optimizer.startswith("AdamW") and r.step_times:
            adam_step.setdefault(
                r.model, (statistics.fmean(r.step_times), statistics.median(r.step_times))
            )
    for r in runs:
        ref = adam_step.get(r.model, (math.nan, math.nan))
        if r.step_times:
            mean = statistics.fmean(r.step_times) / ref[0]
            median = statistics.median(r.step_times) / ref[1]
        else:
            mean = median = math.nan
        target = "-" if r.to_target is None else f"{r.steps_to_target}, {r.to_target:.2f}"
        if r.error:
            outcome = r.error
        elif r.nonfinite_at is not None:
            outcome = f"non-finite at step {r.nonfinite_at}"
        elif r.losses and r.losses[-1] > 10 * r.losses[0]:
            outcome = f"diverged (x{r.losses[-1] / r.losses[0]:.1e})"
        else:
            outcome = "ok"
        lines.append(
            f"| {r.model} | {r.optimizer} | {r.final:.4f} | "
            f"{r.losses[-1] if r.losses else math.nan:.4f} | {r.cpu[-1] if r.cpu else 0:.2f} | "
            f"{r.wall:.2f} | {mean:.2f}x / {median:.2f}x | {target} | {outcome} | "
            f"{r.refused or '-'} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(plots skipped: pip install 'second[plot]')")
        return
    OUT.mkdir(exist_ok=True)
    for mname in sorted({r.model for r in runs}):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for r in runs:
            if r.model != mname or not r.losses:
                continue
            axes[0].plot(r.losses, label=r.optimizer, lw=1)
            axes[1].plot(r.cpu, r.losses, label=r.optimizer, lw=1)
        for ax, xl in zip(axes, ("step", "CPU seconds (training thread)")):
            ax.set_xlabel(xl)
            ax.set_ylabel("training loss")
            ax.set_yscale("log")
        axes[0].legend(fontsize=6)
        fig.suptitle(f"zoo: {mname}")
        fig.tight_layout()
        fig.savefig(OUT / f"zoo_{mname}.png", dpi=110)
        plt.close(fig)


class _ForwardBackward:
    """Not an optimizer: the closure alone (the forward and backward every optimizer pays)."""

    def __init__(self, model):
        self.params = list(model.parameters())

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self, closure):
        return closure()


#: what a KFAC step costs without parts of its work (``--step-floor``)
FLOOR_VARIANTS: dict[str, Callable] = {
    "forward + backward": lambda m, f: _ForwardBackward(m),
    "AdamW lr=0.01": lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "KFAC defaults": lambda m, f: second.optim.KFAC(m, f),
    # no quadratic model and no damping adaptation: the factor machinery alone
    "KFAC fixed lr": lambda m, f: second.optim.KFAC(
        m, f, lr=0.1, momentum=0.9, kl_clip=1e-3, adapt_damping=False
    ),
    # and no Monte-Carlo backward: the factors from the user's own backward pass
    "KFAC fixed lr, empirical": lambda m, f: second.optim.KFAC(
        m, f, lr=0.1, momentum=0.9, kl_clip=1e-3, adapt_damping=False, fisher="empirical"
    ),
}


def _step_times(opt, model, loss_fn, kind, bs) -> list[float]:
    """CPU seconds of each ``opt.step(closure)`` over the batches ``bs``."""
    times = []
    for xb, yb in bs:

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = loss_of(kind, loss_fn, model(xb), yb)
            loss.backward()
            return loss

        t0 = time.thread_time()
        opt.step(closure)
        times.append(time.thread_time() - t0)
    return times


def step_floor(models, steps: int, data: dict, rounds: int = 2, batch_size: int = 128) -> str:
    """Median CPU ms per step (closure included) of :data:`FLOOR_VARIANTS`, over AdamW's.

    The variants run in turn, ``rounds`` times; each entry is the lowest of the rounds'
    medians over steps 5 onwards (the machine is shared: the lowest is the least disturbed).
    """
    names = list(FLOOR_VARIANTS)
    lines = [
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for mname in models:
        spec = MODELS[mname] if mname in MODELS else DROPOUT_MODELS[mname]
        kind = spec["kind"]
        is_lm = kind in ("lm", "lm-flat")
        source = data["lm" if is_lm else "digits"]
        epochs = 1 + steps * batch_size // len(source[0]) if not is_lm else 1
        bs = list(batches(kind, source, 0, epochs, steps, batch_size=batch_size))[:steps]
        best: dict[str, float] = {}
        for _ in range(rounds):
            for name, make in FLOOR_VARIANTS.items():
                torch.manual_seed(0)
                model = spec["make"]()
                loss_fn = nn.MSELoss() if kind == "autoencode" else nn.CrossEntropyLoss()
                times = _step_times(make(model, loss_fn), model, loss_fn, kind, bs)
                ms = 1e3 * statistics.median(times[5:])
                best[name] = min(best.get(name, math.inf), ms)
        adam = best["AdamW lr=0.01"]
        cells = [f"{best[n]:.2f} ({best[n] / adam:.2f}x)" for n in names]
        lines.append(f"| {mname} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="*", default=list(MODELS), choices=[*MODELS, *DROPOUT_MODELS]
    )
    parser.add_argument(
        "--optimizers",
        nargs="*",
        default=None,
        help="names to run, each a substring of the optimizer's name or '=NAME' for that one "
        "(default all)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs on digits (batch 128)")
    parser.add_argument("--lm-steps", type=int, default=400, help="steps of the character LM")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 40 LM steps")
    parser.add_argument(
        "--cpu-budget",
        type=float,
        default=None,
        help="train the character LMs for this many CPU-seconds instead of --lm-steps",
    )
    parser.add_argument(
        "--step-floor",
        action="store_true",
        help="time a step of AdamW, KFAC and KFAC without its quadratic model / Monte-Carlo "
        "backward, and the closure alone, on --models (--floor-steps steps each)",
    )
    parser.add_argument("--floor-steps", type=int, default=45)
    parser.add_argument("--floor-batch", type=int, default=128, help="digits batch size")
    args = parser.parse_args(argv)
    if args.step_floor:
        text = stdlib_text()
        data = {"digits": digits()[0], "lm": text[: int(0.95 * len(text))]}
        print(step_floor(args.models, args.floor_steps, data, batch_size=args.floor_batch))
        return
    if args.quick:
        args.epochs, args.lm_steps = 1, 40
    opts = {n: m for n in SECOND if (m := second_optimizer(n)) is not None}
    opts.update(anchors())
    if args.optimizers:
        opts = {
            k: v
            for k, v in opts.items()
            if any(k == s[1:] if s.startswith("=") else s in k for s in args.optimizers)
        }
    train_d, test_d = digits()
    text = stdlib_text()
    split = int(0.95 * len(text))
    lm_train, lm_val = text[:split], text[split:]
    g = torch.Generator().manual_seed(99)
    starts = torch.randint(0, len(lm_val) - 65, (256,), generator=g)
    val_chunk = lm_val[starts[:, None] + torch.arange(65)]
    lm_test = (val_chunk[:, :-1], val_chunk[:, 1:])
    runs = []
    OUT.mkdir(exist_ok=True)
    with open(OUT / "zoo.jsonl", "w") as log:
        for mname in args.models:
            is_lm = {**MODELS, **DROPOUT_MODELS}[mname]["kind"] in ("lm", "lm-flat")
            for oname, make in opts.items():
                for seed in args.seeds:
                    run = train(
                        mname,
                        oname,
                        make,
                        seed,
                        args.epochs,
                        10**7 if args.cpu_budget and is_lm else args.lm_steps,
                        lm_train if is_lm else train_d,
                        lm_test if is_lm else test_d,
                        cpu_budget=args.cpu_budget if is_lm else None,
                    )
                    runs.append(run)
                    log.write(json.dumps({k: v for k, v in run.__dict__.items()}) + "\n")
                    ms = sorted(1e3 * t for t in run.step_times) or [math.nan]
                    print(
                        f"{mname:17s} {oname:30s} final {run.final:.4f} CPU "
                        f"{run.cpu[-1] if run.cpu else 0:.1f}s step mean / median "
                        f"{sum(ms) / len(ms):.2f} / {ms[len(ms) // 2]:.2f} ms {run.error}",
                        file=sys.stderr,
                        flush=True,
                    )
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads 1, seeds {args.seeds}\n")
    print(table(runs))
    plot(runs)


if __name__ == "__main__":
    main()
