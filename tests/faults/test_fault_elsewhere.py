"""Faults whose fixes belong to other issues: strict xfails that turn green when they land.

* eigsh and eigenvalue multiplicity: issue 17 (fixed: block Lanczos; kept here as fault cases).
* invalid ``second compare`` values: issue 16 (the first-day issue's CLI), fixed: plain tests now.
"""

from __future__ import annotations

import pytest
import torch

from second import eigsh
from second.cli import main


def test_eigsh_returns_k_values_of_a_repeated_eigenvalue():
    vals = eigsh(torch.eye(6, dtype=torch.float64), k=3, return_eigenvectors=False)
    torch.testing.assert_close(vals, torch.ones(3, dtype=torch.float64))


def test_eigsh_smallest_of_a_low_rank_matrix_are_its_zeros():
    g = torch.Generator().manual_seed(0)
    U = torch.randn(8, 2, generator=g, dtype=torch.float64)
    vals = eigsh(U @ U.T, k=4, which="SA", return_eigenvectors=False)
    assert vals.shape == (4,)
    torch.testing.assert_close(vals, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-10)


def _exit_code(argv):
    """``main``'s exit status; a traceback (any other exception) fails the test."""
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


CLI_BAD = {
    "seeds 0": ["--seeds", "0"],
    "seeds -2": ["--seeds", "-2"],
    "ggn-damping nan": ["--ggn-damping", "nan"],
    "threads 0": ["--threads", "0"],
    "tol -1": ["--tol", "-1"],
}


@pytest.mark.parametrize("case", sorted(CLI_BAD))
def test_compare_refuses_invalid_values_with_status_2(case, tmp_path, capsys):
    argv = ["compare", "--seeds", "1", "--methods", "cg", "--no-plot", "--no-progress"]
    argv += ["--out-dir", str(tmp_path / "out"), *CLI_BAD[case]]
    assert _exit_code(argv) == 2
    assert capsys.readouterr().err.strip()  # a message, not a table


def test_compare_refuses_an_out_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("")
    argv = ["compare", "--seeds", "1", "--methods", "cg", "--no-plot", "--no-progress"]
    assert _exit_code([*argv, "--out-dir", str(f)]) == 2
    assert "a-file" in capsys.readouterr().err


def test_compare_does_not_count_a_repeated_method_twice(tmp_path, capsys):
    argv = ["compare", "--seeds", "1", "--methods", "cg,cg", "--no-plot", "--no-progress"]
    rc = _exit_code([*argv, "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 2 or (rc == 0 and "1/1" in out and "2/2" not in out)  # refused, or counted once
