"""The ``second`` command line: ``second compare`` (also ``python -m second compare``).

Every option has help text (``second compare --help``); an invalid value ends in a one-line
error naming the valid ones, with exit status 2 (argparse's convention), before any
computation starts. ``--json`` prints the summary as strict JSON on stdout. A missing optional
dependency (the ``plot`` extra for the PNG) is reported in one line on stderr after the text
result, naming the extra to install.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from pathlib import Path

import torch

from ._optional import MissingExtraError
from ._progress import progress_enabled

__all__ = ["main", "build_parser"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------- value checks
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _method_list(text: str) -> tuple[str, ...]:
    from .compare import METHODS

    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise argparse.ArgumentTypeError(f"no method given; valid: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            close = difflib.get_close_matches(m, METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise argparse.ArgumentTypeError(
                f"unknown method {m!r}{hint}; valid: {', '.join(METHODS)}"
            )
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"method {', '.join(map(repr, repeated))} given more than once"
        )
    return methods


def _file_in_the_way(path: Path) -> str:
    """The first of ``path`` and its parents that is a file (``path`` itself if none is)."""
    for p in [*reversed(path.parents), path]:
        if p.is_file():
            return str(p)
    return str(path)


# ----------------------------------------------------------------------------- compare
def _header(args: argparse.Namespace) -> str:
    return (
        f"# second compare: problem={args.problem}, dtype={args.dtype}, seeds={args.seeds}, "
        f"tol={args.tol}, H damping={args.hessian_damping}, G damping={args.ggn_damping}\n\n"
        "Each method solves A x = g (g the gradient) and is scored against the exact float64 "
        "dense solution. 'seed-cg'/'seed-neumann' are the notebook's own loops: they report "
        "nothing, which is how a cosine of 0.7 or a divergent series goes unnoticed. "
        "'status' says whether the numbers can be trusted: 'converged' (on every seed), "
        "'NOT CONVERGED on k/n' (the method said it did not, on k of n seeds: its numbers are those "
        "of an unfinished answer) or 'unchecked' (no report). 'converged', 'neg. curvature' and "
        "'diverged' count the seeds on which the method itself said so."
    )


def _compare(args: argparse.Namespace) -> int:
    from .compare import (
        DAMPING_NEEDS,
        DEFAULT_METHODS,
        damping_skips,
        jsonable,
        plot_residuals,
        run_compare,
        summarize,
        write_outputs,
    )
    from .problems import check_problem

    parser: argparse.ArgumentParser = args.parser
    methods = args.methods or DEFAULT_METHODS
    damping = {"hessian": args.hessian_damping, "ggn": args.ggn_damping}
    skips = damping_skips(methods, damping)
    flags = {"hessian": "--hessian-damping", "ggn": "--ggn-damping"}
    if args.methods:  # a method asked for by name that its damping rules out: refuse it now
        for method in methods:
            out = [c for c in damping if method in skips[c]]
            if method == "lissa" and out:
                parser.error(
                    f"argument {flags[out[0]]}: lissa needs a damping >= 0, got "
                    f"{damping[out[0]]:g} (drop lissa from --methods; cg, minres and dense "
                    "take a negative damping)"
                )
            if len(out) == len(damping):
                parser.error(
                    f"argument --methods: {method} needs a damping {DAMPING_NEEDS[method]}, but "
                    f"--hessian-damping is {damping['hessian']:g} and --ggn-damping is "
                    f"{damping['ggn']:g}: it would run on neither matrix"
                )
    notes = [
        f"Note: {method} is not run on the {'Hessian' if c == 'hessian' else 'Gauss-Newton matrix'}: "
        f"it needs a damping {DAMPING_NEEDS[method]} and {flags[c]} is {damping[c]:g}."
        for c in damping
        for method in skips[c]
    ]
    out_dir = Path(args.out_dir)
    try:  # refuse a bad --out-dir before computing, not after
        out_dir.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        parser.error(
            f"argument --out-dir: {_file_in_the_way(out_dir)!r} is a file, not a directory"
        )
    except OSError as err:
        parser.error(f"argument --out-dir: cannot create {str(out_dir)!r}: {err.strerror}")
    try:
        check_problem(args.problem)
    except MissingExtraError as err:
        print(f"second: {err}", file=sys.stderr)
        return 1

    torch.set_num_threads(args.threads)
    rows, facts = run_compare(
        problem=args.problem,
        seeds=range(args.seeds),
        dtype=_DTYPES[args.dtype],
        methods=methods,
        hessian_damping=args.hessian_damping,
        ggn_damping=args.ggn_damping,
        tol=args.tol,
        progress=args.progress,
    )
    header = "\n".join([_header(args), *(f"\n{note}" for note in notes)])
    report = write_outputs(rows, facts, out_dir, plot=False, header=header)
    summary = summarize(rows)
    written = [str(out_dir / "compare.md"), str(out_dir / "compare.json")]
    if args.json:
        print(
            json.dumps(
                jsonable(
                    {
                        "settings": {
                            k: v for k, v in vars(args).items() if k not in ("func", "parser")
                        },
                        "summary": summary,
                        "not_run": {c: m for c, m in skips.items() if m},
                        "notes": notes,
                        "facts": facts,
                        "outputs": written,
                    }
                ),
                indent=1,
                allow_nan=False,
            )
        )
    else:
        print(report)
        print(_verdict(summary))
    if not args.no_plot:  # after the text result: a missing matplotlib costs only the PNG
        try:
            plot_residuals(rows, out_dir / "compare.png", seed=rows[0].seed)
            written.append(str(out_dir / "compare.png"))
        except MissingExtraError as err:
            print(f"second: no plot: {err}", file=sys.stderr)
    print(f"wrote {', '.join(written)}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _verdict(summary: list[dict]) -> str:
    by = {(s["curvature"], s["method"]): s for s in summary}
    sc, c, sn, nm, g = (
        by.get(key)
        for key in (
            ("hessian", "seed-cg"),
            ("hessian", "cg"),
            ("hessian", "seed-neumann"),
            ("hessian", "neumann"),
            ("ggn", "cg"),
        )
    )
    mr = by.get(("hessian", "minres-reorth")) or by.get(("hessian", "minres"))
    bad = [f"{s['curvature']}/{s['method']}" for s in summary if s["status"].startswith("NOT")]
    # each note only where its rows exist (``a and b and f"..."`` formats nothing otherwise)
    notes = [
        sc
        and mr
        and (
            f"H^-1 g on an indefinite Hessian: the notebook's CG reaches cosine {sc['cosine_median']:.3f} "
            f"(median) without any warning; {mr['method']} reaches {mr['cosine_median']:.6f} and says it "
            f"converged on {mr['converged']} seeds."
        ),
        c
        and f"second.cg on the same system stops and reports negative curvature on {c['negative_curvature']} seeds instead of returning a wrong answer.",
        sn
        and nm
        and (
            f"The notebook's Neumann series gives cosine {sn['cosine_median']:.4f}; second.neumann "
            f"detects the indefinite operator and reports divergence on {nm['diverged']} seeds."
        ),
        g
        and (
            f"On the damped Gauss-Newton matrix (PSD) CG converges on {g['converged']} seeds, "
            f"median relative error {g['relerr_median']:.1e}."
        ),
        bool(bad)
        and f"Did not converge on every seed (their numbers are not solutions): {', '.join(bad)}.",
    ]
    return "\n".join(["", "What this shows:", *(f"- {note}" for note in notes if note)])


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``second`` command (exposed for documentation and tests).

    Returns:
        An ``argparse.ArgumentParser`` with the ``compare`` subcommand.

    Example:
        >>> args = build_parser().parse_args(["compare", "--seeds", "2", "--methods", "cg,minres"])
        >>> args.seeds, args.methods
        (2, ('cg', 'minres'))
    """
    from . import __version__
    from .compare import METHODS

    parser = argparse.ArgumentParser(
        prog="second", description="Second-order optimization tools for PyTorch."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"second {__version__} (torch {torch.__version__})",
        help="print the version of second and torch, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "compare",
        help="compare inverse-curvature methods against the exact answer",
        description="Solve H x = g and (G + damping I) x = g with every method and score each "
        "against the exact float64 dense solution; writes compare.md, compare.json and "
        "compare.png to --out-dir.",
    )
    p.add_argument(
        "--problem",
        choices=["seed", "digits"],
        default="seed",
        help="seed: the notebook's 26-parameter sigmoid MLP; digits: a tanh MLP on "
        "scikit-learn's digits (needs the 'data' extra). Default: seed",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=5,
        metavar="N",
        help="run seeds 0..N-1 (a positive integer; default 5)",
    )
    p.add_argument(
        "--dtype",
        choices=list(_DTYPES),
        default="float32",
        help="dtype of the model and products (the notebook ran float32; default float32)",
    )
    p.add_argument(
        "--methods",
        type=_method_list,
        default=None,
        metavar="M1,M2,...",
        help=f"comma-separated subset of: {', '.join(METHODS)} (default: all but dense)",
    )
    numbers = [  # (flag, type, default, metavar, help)
        ("--hessian-damping", _finite_float, 0.0, "LAMBDA",
         "damping added to the Hessian, H + LAMBDA I (finite; negative is a shift; default 0)"),
        ("--ggn-damping", _finite_float, 1e-2, "LAMBDA",
         "damping added to the Gauss-Newton matrix, G + LAMBDA I (finite; default 0.01)"),
        ("--tol", _positive_float, 1e-6, None,
         "relative tolerance of the solvers, ||b - A x|| <= tol ||b|| (positive; default 1e-6)"),
        ("--threads", _positive_int, 1, "N", "torch threads (a positive integer; default 1)"),
    ]  # fmt: skip
    for flag, kind, default, metavar, text in numbers:
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)
    p.add_argument(
        "--out-dir",
        default="demo-output",
        metavar="DIR",
        help="directory for compare.md, compare.json and compare.png, created if missing "
        "(default demo-output)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the summary as JSON on stdout instead of the Markdown table",
    )
    p.add_argument("--no-plot", action="store_true", help="do not write compare.png")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar over seeds (default: only when stderr is a terminal and "
        "SECOND_PROGRESS is not 0)",
    )
    p.set_defaults(func=_compare, parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``second`` console script.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 when a needed optional dependency is missing.

    Raises:
        SystemExit: with status 2 for an invalid argument (a one-line message on stderr), or 0
            for ``--help``/``--version``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.progress is None:
        try:
            args.progress = progress_enabled()
        except ValueError as err:  # a bad SECOND_PROGRESS: a one-line error, exit 2
            getattr(args, "parser", parser).error(str(err))
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
