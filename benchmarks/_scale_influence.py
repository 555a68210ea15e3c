"""Influence at scale: second's EK-FAC beside kronfluence's, fit and pairwise scores.

    python benchmarks/_scale_influence.py [--sizes 150k-1k 150k-5k 564k-5k 1M-20k 10M-2k]
                                          [--kronfluence-1m] [--fisher type2|mc]
                                          [--out bench-output/scale_influence.json]

(also ``python benchmarks/bench_scale.py --part influence ...``). ReLU MLPs
64 -> w -> w -> w -> 10 (w = 256: 150,794 parameters; 512: 563,722; 700: 1,033,910) at
their random initialization, synthetic Gaussian inputs with random labels, cross-entropy
(mean), 100 query points, batch 256, EK-FAC with the same damping on both sides
(``DAMPING``, added to the eigenvalues of the mean-normalized curvature; kronfluence's
scores are ``n`` times second's, which Pearson and the top-10 overlap ignore).

Every stage of every library runs in a fresh subprocess (``--worker``) that imports both
libraries and builds the data first; it reports the CPU time of the stage
(``time.process_time``), its wall time, and the increase of the peak resident memory over
the memory before the stage (``ru_maxrss`` minus ``VmRSS``). The fit stage writes the
factors to disk (second: its safetensors cache; kronfluence: its output directory) and
the scores stage reads them, so each stage is measured alone. second fits the exact
type-2 Fisher (``--fisher mc``: one sampled label per example, kronfluence's estimator).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import rss

DAMPING = 1e-3
SIZES = {  # name: (width, n_train, n_query)
    "150k-1k": (256, 1000, 100),
    "150k-5k": (256, 5000, 100),
    "564k-5k": (512, 5000, 100),
    "1M-20k": (700, 20000, 100),
    "10M-2k": (2220, 2000, 10),  # 10,027,750 parameters: second alone, only when asked for
}
SECOND_ALONE = ("1M-20k", "10M-2k")  # kronfluence only with --kronfluence-1m (1M-20k)
BATCH = 256


def _setup(width: int, n: int, q: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    ).eval()
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    Xq, yq = torch.randn(q, 64, generator=g), torch.randint(0, 10, (q,), generator=g)
    return model, (X, y), (Xq, yq)


def _second(stage: str, model, train, query, root: Path, fisher: str):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import second

    loader = DataLoader(TensorDataset(*train), batch_size=BATCH, shuffle=False)
    inf = second.Influence(
        model,
        nn.CrossEntropyLoss(),
        loader,
        curvature="ekfac",
        damping=DAMPING,
        batch_size=BATCH,
        cache_dir=root / "second",
        progressbar=False,
        curvature_options={"fisher": fisher},
    )
    if stage == "fit":
        inf.operator  # noqa: B018 - fitted and stored
        return None
    S = inf.scores(query)
    torch.save(S.float(), root / "second_scores.pt")
    return None


def kronfluence_task():
    """kronfluence's task for ``(x, y)`` batches and cross-entropy.

    Labels sampled from the model for the factors (its Monte-Carlo Fisher), the observed
    loss as the measurement.
    """
    import torch
    from kronfluence.task import Task
    from torch import nn

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
            return nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return nn.functional.cross_entropy(model(x), y, reduction="sum")

    return Classification()


def _kronfluence(stage: str, model, train, query, root: Path):
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from torch.utils.data import TensorDataset

    task = kronfluence_task()
    model = prepare_model(model, task)
    an = Analyzer(
        analysis_name="scale",
        model=model,
        task=task,
        output_dir=str(root / "kronfluence"),
        disable_model_save=True,
        cpu=True,
        disable_tqdm=True,
    )
    if stage == "fit":
        an.fit_all_factors(
            factors_name="f",
            dataset=TensorDataset(*train),
            per_device_batch_size=BATCH,
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        return None
    an.compute_pairwise_scores(
        scores_name="s",
        factors_name="f",
        query_dataset=TensorDataset(*query),
        train_dataset=TensorDataset(*train),
        per_device_query_batch_size=query[0].shape[0],
        per_device_train_batch_size=BATCH,
        score_args=ScoreArguments(damping_factor=DAMPING),
        overwrite_output_dir=True,
    )
    S = an.load_pairwise_scores("s")["all_modules"]
    torch.save(S.float(), root / "kronfluence_scores.pt")
    return None


def worker(lib: str, stage: str, size: str, root: Path, fisher: str) -> dict:
    """One stage of one library, measured (run in a fresh process)."""
    import torch
    import torch._dynamo  # noqa: F401 - a one-time import torch.func may trigger: outside the timing

    import second  # noqa: F401

    if lib == "kronfluence":
        import kronfluence.analyzer  # noqa: F401

    torch.set_num_threads(1)
    width, n, q = SIZES[size]
    model, train, query = _setup(width, n, q)
    before = rss()
    t0, w0 = time.process_time(), time.perf_counter()
    if lib == "second":
        _second(stage, model, train, query, root, fisher)
    else:
        _kronfluence(stage, model, train, query, root)
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "peak_mb": round((peak - before) / 2**20, 1),  # the stage's increase
        "peak_abs_mb": round(peak / 2**20, 1),  # the whole process, torch included
    }


def _run_worker(lib, stage, size, root, fisher, timeout) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", lib, stage, size, str(root), "--fisher", fisher]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if out.returncode != 0:
        return {"error": (out.stderr or out.stdout).strip().splitlines()[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(root: Path) -> dict:
    """Pearson correlation (all entries) and mean top-10 overlap per query."""
    import torch

    a = torch.load(root / "second_scores.pt").double()
    b = torch.load(root / "kronfluence_scores.pt").double()
    x, y = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    pearson = float(x @ y / (x.norm() * y.norm()))
    k = 10
    ta, tb = a.topk(k, dim=1).indices, b.topk(k, dim=1).indices
    overlap = sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(ta, tb)) / (k * len(a))
    return {"pearson": round(pearson, 4), "top10_overlap": round(overlap, 3)}


def main(argv: list[str] | None = None) -> dict:
    """Run the sizes, both libraries side by side; print a table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=list(SIZES)[:4], choices=list(SIZES))
    p.add_argument("--kronfluence-1m", action="store_true", help="also run kronfluence at 1M-20k")
    p.add_argument("--fisher", default="type2", choices=["type2", "mc"])
    p.add_argument("--timeout", type=int, default=900, help="seconds per stage")
    p.add_argument("--out", default="bench-output/scale_influence.json")
    p.add_argument("--worker", nargs=4, metavar=("LIB", "STAGE", "SIZE", "DIR"))
    args = p.parse_args(argv)
    if args.worker:
        lib, stage, size, root = args.worker
        print(json.dumps(worker(lib, stage, size, Path(root), args.fisher)))
        return {}
    results: dict = {"damping": DAMPING, "fisher": args.fisher, "sizes": {}}
    for size in args.sizes:
        width, n, q = SIZES[size]
        libs = ["second"]
        if size not in SECOND_ALONE or (size == "1M-20k" and args.kronfluence_1m):
            libs.append("kronfluence")
        row: dict = {"width": width, "n_train": n, "n_query": q}
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            for lib in libs:
                for stage in ("fit", "scores"):
                    r = _run_worker(lib, stage, size, root, args.fisher, args.timeout)
                    row[f"{lib}_{stage}"] = r
                    print(f"{size:8s} {lib:12s} {stage:7s} {r}", flush=True)
            if len(libs) == 2 and all("error" not in row[f"{lib}_scores"] for lib in libs):
                row.update(compare(root))
                print(f"{size:8s} agreement  {compare(root)}", flush=True)
        results["sizes"][size] = row
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
