"""``make gpu-check``'s script: skips without CUDA, and its checks pass on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _run(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_skips_cleanly_without_cuda_or_runs_with_it():
    r = _run("--width", "32", "--batch", "64")
    assert r.returncode == 0, r.stderr
    if torch.cuda.is_available():
        assert r.stdout.rstrip().endswith("gpu-check: all checks passed")
    else:
        assert r.stdout.strip() == "gpu-check: skipped (no CUDA device)"


@pytest.mark.slow
def test_the_same_checks_pass_on_the_cpu():
    r = _run("--device", "cpu", "--width", "16", "--batch", "32")
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "HVP" in out and "KFAC:" in out and "influence (cpu)" in out
    assert out.rstrip().endswith("gpu-check: all checks passed")
