"""What finding the loss input in the model output costs KFAC per loss call.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loss_map.py [--vocab 2000 8000] [--batch 8] [--context 512] [--forms shifted temperature bias mask]

Language-model code computes its loss on ``logits[:, :-1].contiguous().view(-1, V)``; KFAC's
loss hook maps that tensor back onto the model output (``second.optim._views.loss_on_output``)
to take the curvature of the loss as written. The map is searched by backward passes over the
graph between the two and cached by the graph's signature, so a training loop pays for it once.
For each vocabulary size and form of the loss input, in a fresh subprocess (peak memory is a
high-water mark): the first call (a search) and the median of 20 later calls (cache hits, or
searches where the map cannot be cached), CPU seconds of the thread and the resident memory
the call added, beside the loss and its backward pass on the same logits. Forms: the shifted
copy, the same divided by a temperature, plus a logit bias, and the rows of a mask
(``logits[mask]``, 85% of the positions: an index whose map changes with the batch).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


FORMS = ("shifted", "temperature", "bias", "mask")


def measure(vocab: int, batch: int, context: int, form: str = "shifted") -> dict:
    from second.optim._views import loss_on_output

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, vocab, generator=g, requires_grad=True)
    h = torch.randn(batch, context, 64, generator=g)
    y = torch.randint(0, vocab, (batch, context), generator=g)
    bias = torch.randn(vocab, generator=g)
    mask = torch.rand(batch, context, generator=g) < 0.85

    def loss_input(out):
        if form == "mask":
            return out[mask], y[mask]
        x = out[:, :-1]
        x = {"shifted": x, "temperature": x / 2.0, "bias": x + bias}[form]
        return x.contiguous().view(-1, vocab), y[:, :-1].reshape(-1)

    def call():
        out = h @ w
        x, target = loss_input(out)
        t = time.thread_time()
        found = loss_on_output(x, out, target, -100)
        return time.thread_time() - t, found, x, target

    before = _rss_mb()
    first, found, x, target = call()
    grown = _rss_mb() - before
    assert found is not None and found.dim == 2
    later = [call()[0] for _ in range(20)]
    t = time.thread_time()
    nn.functional.cross_entropy(x, target).backward()
    loss_s = time.thread_time() - t
    return dict(
        vocab=vocab,
        form=form,
        logits_mb=batch * context * vocab * 4 / 1e6,
        first_s=first,
        first_mb=grown,
        cached_ms=1e3 * statistics.median(later),
        loss_s=loss_s,
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--forms", nargs="+", choices=FORMS, default=["shifted"])
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.vocab[0], args.batch, args.context, args.forms[0])))
        return
    print(f"torch {torch.__version__}, batch {args.batch}, context {args.context}, one thread\n")
    print(
        "| vocabulary | loss input | logits MB | first call CPU s | its memory MB | later calls CPU ms (median of 20) | loss + backward CPU ms |"
    )
    print("|---|---|---|---|---|---|---|")
    for v, form in [(v, f) for v in args.vocab for f in args.forms]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            "--vocab",
            str(v),
            "--batch",
            str(args.batch),
            "--context",
            str(args.context),
            "--forms",
            form,
        ]
        r = json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
        )
        print(
            f"| {v:,} | {form} | {r['logits_mb']:.0f} | {r['first_s']:.2f} | {r['first_mb']:.0f} | "
            f"{r['cached_ms']:.2f} | {1e3 * r['loss_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
