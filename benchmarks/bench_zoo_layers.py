"""Which approximation each zoo parameter gets from KFAC, and what the layer rules change.

``--table`` (default): for every model of ``bench_zoo.py``, ``second.optim.KFAC``'s
``approximations()`` after one training step, summarized per model (parameters and
entries per approximation) and listed per parameter.

``--compare MODEL ...``: trains the model with KFAC's defaults four ways, same seed and
batches as ``bench_zoo.py`` (its ``train``): the layer rules as they are (the default
``weight_sharing="auto"``: ``nn.Conv2d`` reduces, the rest expands), with ``"expand"`` and
with ``"reduce"`` everywhere, and with the coverage before the attention/normalization
rules (``legacy``: ``nn.MultiheadAttention`` and the norm layers left to the diagonal
fallback, as before issue 14's layer coverage), plus AdamW at lr 1e-2 for the step cost.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_zoo_layers.py [--table]
        [--compare char-transformer cnn] [--variants auto expand legacy] [--epochs 5]
        [--lm-steps 400]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

import second.optim
from second.kfac import RULES

sys.path.insert(0, str(Path(__file__).parent))
import bench_zoo  # noqa: E402  (the zoo's models, data and training loop)

LEGACY_REMOVED = (
    nn.MultiheadAttention,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._BatchNorm,
)


@contextlib.contextmanager
def legacy_coverage():
    """The rules registry without the attention and normalization rules."""
    saved = {t: RULES.pop(t) for t in LEGACY_REMOVED if t in RULES}
    try:
        yield
    finally:
        RULES.update(saved)


def data_for(kind):
    """Training and test data as ``bench_zoo.main`` makes them."""
    if kind != "lm":
        return bench_zoo.digits()
    text = bench_zoo.stdlib_text()
    split = int(0.95 * len(text))
    train, val = text[:split], text[split:]
    g = torch.Generator().manual_seed(99)
    starts = torch.randint(0, len(val) - 65, (256,), generator=g)
    chunk = val[starts[:, None] + torch.arange(65)]
    return train, (chunk[:, :-1], chunk[:, 1:])


def approximation_table() -> str:
    summary = [
        "| model | parameters | Kronecker (expand / plain) | diagonal-exact | diagonal |",
        "|---|---|---|---|---|",
    ]
    detail = ["| model | parameter | shape | approximation |", "|---|---|---|---|"]
    for mname, spec in bench_zoo.MODELS.items():
        kind = spec["kind"]
        train, _ = data_for(kind)
        torch.manual_seed(0)
        model = spec["make"]()
        loss_fn = nn.MSELoss() if kind == "autoencode" else nn.CrossEntropyLoss()
        opt = second.optim.KFAC(model, loss_fn)
        xb, yb = next(bench_zoo.batches(kind, train, 0, 1, 1))
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
        labels = opt.approximations()
        opt.close()
        shapes = dict(model.named_parameters())
        numel: Counter[str] = Counter()
        count: dict[str, int] = defaultdict(int)
        for name, label in labels.items():
            numel[label] += shapes[name].numel()
            count[label] += 1
            detail.append(f"| {mname} | {name} | {tuple(shapes[name].shape)} | {label} |")
        kron = (
            f"{count['kronecker-expand']} / {count['kronecker']} tensors, "
            f"{numel['kronecker-expand'] + numel['kronecker']:,} entries"
        )
        summary.append(
            f"| {mname} | {sum(numel.values()):,} | {kron} | "
            f"{count['diagonal-exact']} ({numel['diagonal-exact']:,}) | "
            f"{count['diagonal']} ({numel['diagonal']:,}) |"
        )
    return "\n".join(summary) + "\n\n" + "\n".join(detail)


def compare(models, epochs, lm_steps, only=None, seeds=(0,)) -> str:
    variants = {
        "KFAC auto (default: Conv2d reduce, the rest expand)": (
            lambda m, f: second.optim.KFAC(m, f),
            None,
        ),
        "KFAC expand": (lambda m, f: second.optim.KFAC(m, f, weight_sharing="expand"), None),
        "KFAC reduce": (lambda m, f: second.optim.KFAC(m, f, weight_sharing="reduce"), None),
        "KFAC legacy coverage": (lambda m, f: second.optim.KFAC(m, f), legacy_coverage),
        "AdamW lr=0.01": (lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-2), None),
    }
    if only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in only)}
        variants.setdefault(
            "AdamW lr=0.01", (lambda m, f: torch.optim.AdamW(m.parameters(), lr=1e-2), None)
        )
    lines = [
        "| model | seed | variant | final (acc / val loss) | CPU s | median step cost vs AdamW "
        "| outcome |",
        "|---|---|---|---|---|---|---|",
    ]
    for mname in models:
        kind = bench_zoo.MODELS[mname]["kind"]
        train, test = data_for(kind)
        for seed in seeds:
            runs = {}
            for vname, (make, ctx) in variants.items():
                with ctx() if ctx else contextlib.nullcontext():
                    runs[vname] = bench_zoo.train(
                        mname, vname, make, seed, epochs, lm_steps, train, test
                    )
            adam = statistics.median(runs["AdamW lr=0.01"].step_times)
            for vname, r in runs.items():
                outcome = r.error or ("non-finite" if r.nonfinite_at is not None else "ok")
                cost = statistics.median(r.step_times) / adam if r.step_times else float("nan")
                target = "" if r.to_target is None else f", 97% at step {r.steps_to_target}"
                lines.append(
                    f"| {mname} | {seed} | {vname} | {r.final:.4f} | "
                    f"{r.cpu[-1] if r.cpu else 0:.1f} | {cost:.2f}x | "
                    f"{outcome}{target} {r.refused or ''} |"
                )
                print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--compare", nargs="*", default=[], choices=list(bench_zoo.MODELS))
    parser.add_argument("--variants", nargs="*", default=None, help="substrings of variant names")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lm-steps", type=int, default=400)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.table or not args.compare:
        print(approximation_table())
    if args.compare:
        print(compare(args.compare, args.epochs, args.lm_steps, args.variants, args.seeds))


if __name__ == "__main__":
    main()
