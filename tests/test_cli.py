"""The main job: ``second compare``."""

from __future__ import annotations

import json
import math

import torch

from second.cli import main
from second.compare import run_compare, summarize


def test_compare_seed_problem_shows_failure_and_fix():
    rows, facts = run_compare(
        seeds=[0],
        dtype=torch.float64,
        progress=False,
        methods=["seed-cg", "seed-neumann", "cg", "minres", "neumann", "auto"],
    )
    s = {(r["curvature"], r["method"]): r for r in summarize(rows)}
    assert facts[0]["hessian"]["negative_eigenvalues"] > 0  # the seed Hessian is indefinite
    assert s[("hessian", "auto")]["relerr_median"] < 1e-10
    assert s[("hessian", "minres")]["cosine_median"] > 0.9999
    assert s[("hessian", "cg")]["negative_curvature"] == "1/1"
    assert s[("hessian", "neumann")]["diverged"] == "1/1"
    assert s[("hessian", "seed-neumann")]["cosine_median"] < 0.5
    assert s[("ggn", "cg")]["converged"] == "1/1"


def test_cli_writes_report_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "compare",
            "--seeds",
            "1",
            "--methods",
            "seed-cg,cg,minres,auto",
            "--out-dir",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| hessian | minres |" in printed and "What this shows" in printed
    data = json.loads((out / "compare.json").read_text())
    assert {r["method"] for r in data["summary"]} == {"seed-cg", "cg", "minres", "auto"}
    assert all(math.isfinite(r["matvecs_median"]) for r in data["summary"])
    assert (out / "compare.png").stat().st_size > 10_000
    assert (out / "compare.md").read_text().startswith("# second compare")


def test_cli_rejects_unknown_method(tmp_path, capsys):
    assert main(["compare", "--methods", "bogus", "--out-dir", str(tmp_path), "--no-progress"]) == 2
