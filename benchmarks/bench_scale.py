"""Curvature at scale: influence, spectra and diagonals beside the libraries users would pick.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_scale.py --part spectra|diagonal|influence|all [options]

* ``spectra``: top-1/top-5 Hessian eigenvalues and the trace of a 597,874-parameter CNN, second
  against PyHessian, hessian-eigenthings and curvlinops (benchmarks/_scale_spectra.py; its
  options, e.g. ``--n 1000 --quantity top1``, pass through).
* ``diagonal``: the exact GGN diagonal against laplace-torch and BackPACK
  (benchmarks/bench_diagonal.py; ``--models mlp,cnn --n-cnn 500``).
* ``influence``: EK-FAC influence against kronfluence (benchmarks/_scale_influence.py).

Options after the part go to that part's ``main``; with ``--part all`` each part runs with its
defaults. Every measurement runs in a subprocess of its own (peak memory per measurement).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PARTS = {"spectra": "_scale_spectra", "diagonal": "bench_diagonal", "influence": "_scale_influence"}


def run_part(part: str, argv: list[str]) -> None:
    module = PARTS[part]
    if not (HERE / f"{module}.py").exists():
        print(f"--part {part}: benchmarks/{module}.py is missing; skipped")
        return
    print(f"== {part} ({module}.py) ==", flush=True)
    importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> None:
    # -h after --part PART is the part's own help
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=False)
    ap.add_argument("--part", choices=[*PARTS, "all"])
    args, rest = ap.parse_known_args(argv)
    if args.part is None:
        ap.print_help()
        if not {"-h", "--help"} & set(rest):
            ap.error("--part is required")
        return
    if args.part == "all":
        if rest:
            ap.error("--part all runs every part with its defaults; pass options to one part")
        for part in PARTS:
            run_part(part, [])
    else:
        run_part(args.part, rest)


if __name__ == "__main__":
    main()
