"""The main job: ``second compare``, and a command line that helps."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from second import __version__
from second.cli import build_parser, main
from second.compare import METHODS, Row, format_table, run_compare, summarize


def _exit(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


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
    # the status says which numbers are solutions
    assert s[("hessian", "auto")]["status"] == "converged"
    assert s[("hessian", "cg")]["status"] == "NOT CONVERGED on 1/1"
    assert s[("hessian", "seed-cg")]["status"] == "unchecked"


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
    # a row that did not converge is flagged before its numbers
    assert "| hessian | cg | NOT CONVERGED on 1/1 |" in printed
    assert "| hessian | seed-cg | unchecked |" in printed
    data = json.loads((out / "compare.json").read_text())
    assert {r["method"] for r in data["summary"]} == {"seed-cg", "cg", "minres", "auto"}
    assert all(math.isfinite(r["matvecs_median"]) for r in data["summary"])
    assert (out / "compare.png").stat().st_size > 10_000
    assert (out / "compare.md").read_text().startswith("# second compare")


def test_cli_json_is_strict_json_on_stdout(tmp_path, capsys):
    argv = ["compare", "--seeds", "1", "--methods", "seed-cg,auto", "--no-plot", "--json"]
    assert main([*argv, "--out-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    # strict JSON: NaN (the notebook's CG on G) becomes null instead of an invalid token
    data = json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["settings"]["seeds"] == 1 and data["settings"]["methods"] == ["seed-cg", "auto"]
    statuses = {(s["curvature"], s["method"]): s["status"] for s in data["summary"]}
    assert statuses[("hessian", "auto")] == "converged"
    assert statuses[("ggn", "seed-cg")] == "unchecked"
    assert "wrote" in captured.err  # the file list goes to stderr, stdout is JSON only
    json.loads((tmp_path / "compare.json").read_text(), parse_constant=pytest.fail)


def test_format_table_flags_unconverged_rows_before_their_numbers():
    row = {
        "curvature": "hessian",
        "method": "minres",
        "status": "NOT CONVERGED on 5/5",
        "cosine_median": 0.999971,
        "cosine_min": -0.056919,
        "relerr_median": 7.8e-3,
        "relerr_max": 1.01,
        "matvecs_median": 105,
        "ms_median": 1.0,
        "converged": "0/5",
        "negative_curvature": "5/5",
        "diverged": "0/5",
    }
    line = format_table([row]).splitlines()[-1]
    assert line.index("NOT CONVERGED on 5/5") < line.index("0.999971")


def _row(seed, cosine, error):
    return Row(
        seed=seed,
        curvature="hessian",
        method="cg",
        cosine=cosine,
        relative_error=error,
        matvecs=10,
        seconds=0.001,
        converged=math.isfinite(error),
        negative_curvature=False,
        diverged=not math.isfinite(error),
        message="",
    )


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_summary_medians_count_a_nan_seed_as_the_worst(order):
    """statistics.median sorts, and NaN sorts nowhere: errors [nan, 1.0, 0.01] had the median
    0.01 (the best seed's), and the answer moved with the seeds' order."""
    values = [(math.nan, math.nan), (0.3, 1.0), (0.999, 0.01)]
    rows = [_row(i, *values[i]) for i in order]
    (s,) = summarize(rows)
    assert s["relerr_median"] == 1.0 and s["cosine_median"] == 0.3
    # the extremes too (regression: they were the NaN itself, printed "nan")
    assert s["relerr_max"] == math.inf and s["cosine_min"] == -math.inf
    assert s["nan_seeds"] == 1
    line = format_table([s]).splitlines()[-1]
    assert "-inf" in line and "/ inf" in line and "nan" not in line


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "bogus"], "valid: " + ", ".join(METHODS)),
        (["--methods", "cgg"], "did you mean 'cg'?"),
        (["--methods", "cg,minres,cg"], "'cg' given more than once"),
        (["--methods", ","], "no method given"),
        (["--seeds", "0"], "positive integer"),
        (["--seeds", "two"], "positive integer, got 'two'"),
        (["--threads", "-1"], "positive integer"),
        (["--tol", "0"], "positive finite number"),
        (["--tol", "inf"], "finite number"),
        (["--hessian-damping", "nan"], "finite number"),
        (["--dtype", "float16"], "invalid choice"),
        (["--problem", "mnist"], "invalid choice: 'mnist' (choose from"),
    ],
)
def test_cli_invalid_values_exit_2_with_one_line_naming_the_valid_ones(
    argv, message, tmp_path, capsys
):
    assert _exit(["compare", "--no-plot", "--out-dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("second compare: error: argument ")
    assert message in err[-1]
    assert not (tmp_path / "o" / "compare.md").exists()  # refused before computing


def test_cli_out_dir_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    argv = ["compare", "--seeds", "1", "--methods", "cg", "--no-plot"]
    assert _exit([*argv, "--out-dir", str(f / "sub")]) == 2
    err = capsys.readouterr().err
    # regression: the message named the path asked for, not the file in its way
    assert f"--out-dir: {str(f)!r} is a file" in err


def test_cli_version(capsys):
    assert _exit(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"second {__version__} (torch ")


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    parsers = [parser, *subparsers[0].choices.values()]
    assert len(parsers) == 2
    for p in parsers:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_the_command_has_no_traceback_on_a_missing_command(capsys):
    assert _exit([]) == 2
    assert "required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hessian-damping", "-1", "--methods", "cg,lissa"], "--hessian-damping: lissa needs"),
        (
            ["--ggn-damping", "-5", "--methods", "lissa"],
            "--ggn-damping: lissa needs a damping >= 0",
        ),
        (["--ggn-damping", "0", "--methods", "lowrank"], "--methods: lowrank needs a damping > 0"),
    ],
)
def test_a_damping_the_chosen_method_refuses_is_an_error_before_computing(
    argv, message, tmp_path, capsys
):
    """Regression: a traceback after the exact solutions (lissa), or an IndexError / an
    empty table with exit 0 (lowrank with no positive damping)."""
    assert _exit(["compare", "--seeds", "1", "--out-dir", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("second compare: error: argument ") and message in err[-1]
    assert not (tmp_path / "o").exists()


def test_methods_a_damping_rules_out_are_named_in_the_report(tmp_path, capsys, monkeypatch):
    """Regression: with the default methods, zero damping dropped the lowrank row silently
    (and a negative one made lissa raise)."""
    import second.cli

    monkeypatch.setattr("second.compare.DEFAULT_METHODS", ("cg", "lissa", "lowrank"))
    argv = ["compare", "--seeds", "1", "--no-plot", "--no-progress", "--out-dir", str(tmp_path)]
    assert second.cli.main([*argv, "--hessian-damping", "-1"]) == 0
    out = capsys.readouterr().out
    for method, need in (("lissa", ">= 0"), ("lowrank", "> 0")):
        note = f"Note: {method} is not run on the Hessian: it needs a damping {need}"
        assert note in out and note in (tmp_path / "compare.md").read_text()
    assert "| ggn | lowrank |" in out and "| hessian | lowrank |" not in out


def test_a_bad_progress_variable_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """Regression: a traceback with exit status 1."""
    monkeypatch.setenv("SECOND_PROGRESS", "maybe")
    assert _exit(["compare", "--seeds", "1", "--methods", "cg", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: SECOND_PROGRESS='maybe'" in err[-1] and "yes" in err[-1]
