"""``second compare``: every inverse-curvature method against the exact answer.

By default it reproduces the seed notebook's experiment — the 26-parameter sigmoid
MLP, ``H^-1 g`` and ``G^-1 g`` — on several seeds, with the notebook's own CG and
Neumann loops as baselines, and reports cosine and relative error to the exact
(float64, dense) solution, products used, time, and the convergence and
negative-curvature flags each method returned.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ._optional import require
from ._progress import progress as progress_bar
from .func import eigenvalue_cutoff
from .metrics import cosine_similarity, relative_error
from .operators import GGNOperator, HessianOperator
from .problems import PROBLEMS
from .solvers import solve

__all__ = [
    "Row",
    "run_compare",
    "exact_solution",
    "summarize",
    "format_table",
    "readme_excerpt",
    "plot_residuals",
    "write_outputs",
    "jsonable",
    "DEFAULT_METHODS",
    "METHODS",
    "damping_skips",
]

DEFAULT_METHODS = (
    "seed-cg",
    "seed-neumann",
    "cg",
    "minres",
    "minres-reorth",
    "neumann",
    "lissa",
    "lowrank",
    "auto",
)
# every method ``compare`` knows: the defaults plus the dense direct solve
METHODS = (*DEFAULT_METHODS, "dense")
# what a method needs of the damping: lowrank inverts (A + damping I) on the complement of
# its kept eigenvectors (damping > 0), LiSSA refuses a shift (damping >= 0)
DAMPING_NEEDS = {"lowrank": "> 0", "lissa": ">= 0"}

REFERENCE_RCOND = 1e-10
"""The reference solution's relative eigenvalue cutoff (:func:`second.func.eigenvalue_cutoff`):
looser than the default ``n eps``, so that the exact zero modes of a float64 Hessian (the
softmax shift, constant features), which carry no gradient, are dropped with their rounding."""


def damping_skips(methods: Sequence[str], damping: dict[str, float]) -> dict[str, list[str]]:
    """Per curvature, the ``methods`` its damping rules out (see ``DAMPING_NEEDS``).

    Example:
        >>> damping_skips(["cg", "lowrank", "lissa"], {"hessian": -1.0, "ggn": 0.01})
        {'hessian': ['lowrank', 'lissa'], 'ggn': []}
    """

    def ruled_out(method: str, lam: float) -> bool:
        need = DAMPING_NEEDS.get(method)
        return (need == "> 0" and lam <= 0) or (need == ">= 0" and lam < 0)

    return {c: [m for m in methods if ruled_out(m, lam)] for c, lam in damping.items()}


@dataclass
class Row:
    """One (seed, curvature, method) measurement."""

    seed: int
    curvature: str
    method: str
    cosine: float
    relative_error: float
    matvecs: int
    seconds: float
    converged: bool | None
    negative_curvature: bool | None
    diverged: bool | None
    message: str
    residuals: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------- seed baselines
def _seed_cg(mvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 40):
    """The notebook's CG loop as it ran (x0 = b, no safeguards)."""
    x = b.clone()
    r = b - mvp(x)
    p = r.clone()
    hist = [float(r.norm())]
    for _ in range(iters):
        Ap = mvp(p)
        alpha = (r @ r) / (p @ Ap)
        x = x + alpha * p
        r_new = r - alpha * Ap
        beta = (r_new @ r_new) / (r @ r)
        p = r_new + beta * p
        r = r_new
        hist.append(float(r.norm()))
    return x, iters + 1, hist


def _seed_neumann(mvp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10, scale: float = 4.5):
    """The notebook's hand-tuned Neumann loop (p <- v + p - H p / 4.5), as it ran."""
    p = b.clone()
    hist = []
    for _ in range(iters):
        Ap = mvp(p)
        hist.append(float((b - Ap / scale).norm()))
        p = b + p - Ap / scale
    return p, iters, hist  # as in the notebook: p approximates (H / scale)^-1 v


# ----------------------------------------------------------------------------- one problem
def exact_solution(problem, curvature: str, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    """The float64 reference ``(x, g, kept eigenvalues)`` for ``(A + damping I) x = g``.

    ``A`` is the Hessian or GGN of ``problem`` (converted to float64) and ``g`` its gradient;
    ``x`` is the minimum-norm solution (eigenvalues below ``REFERENCE_RCOND max|lambda|`` are
    dropped).
    """
    problem64 = problem.to(torch.float64)
    op_cls = HessianOperator if curvature == "hessian" else GGNOperator
    op = op_cls(problem64.model, problem64.loss_fn, problem64.data)
    A = op.to_dense()
    g = op.gradient()
    A = A + damping * torch.eye(A.shape[0], dtype=A.dtype)
    evals, vecs = torch.linalg.eigh(0.5 * (A + A.T))
    # the minimum-norm solution: exact zero modes (e.g. the softmax shift, constant features)
    # carry no gradient, and Krylov methods started at 0 never leave their complement
    keep = evals.abs() > eigenvalue_cutoff(evals, rcond=REFERENCE_RCOND)
    x = vecs[:, keep] @ ((vecs[:, keep].T @ g) / evals[keep])
    return x, g, evals[keep]


def _run_method(method: str, op, b: Tensor, damping: float, tol: float, n: int):
    t0 = time.perf_counter()
    if method == "seed-cg":
        # the notebook's loops use a raw product: no finiteness check, as it ran
        x, mv, hist = _seed_cg(lambda v: op._matvec(v) + damping * v, b)
        res = None
    elif method == "seed-neumann":
        x, mv, hist = _seed_neumann(lambda v: op._matvec(v) + damping * v, b)
        res = None
    else:
        opts: dict = {"tol": tol, "damping": damping, "warn": False}
        name = method
        if method == "minres-reorth":
            name = "minres"
            opts.update(recurrence_dtype=torch.float64, reorthogonalize=True)
        if method in ("minres", "minres-reorth"):
            opts["maxiter"] = 4 * n
        if method == "cg":
            opts["maxiter"] = 4 * n
        if method == "neumann":
            opts["maxiter"] = 20000
        if method == "lowrank":
            opts["rank"] = min(20, n)
        if method == "lissa":
            opts["tol"] = max(tol, 1e-4)
        res = solve(op, b, method=name, **opts)
        x, hist, mv = res.x, list(res.residual_norms), res.matvecs
    secs = time.perf_counter() - t0
    return x, mv, secs, hist, res


def compare_problem(
    problem_name: str,
    seed: int,
    dtype: torch.dtype,
    methods: Sequence[str],
    damping: dict[str, float],
    tol: float,
) -> tuple[list[Row], dict]:
    """Run every method on one seed of one problem, for the Hessian and the GGN."""
    problem = PROBLEMS[problem_name](seed=seed, dtype=dtype)
    rows, facts = [], {}
    skips = damping_skips(methods, damping)  # not run: the damping rules them out
    for curvature in ("hessian", "ggn"):
        lam = damping[curvature]
        exact, _, evals = exact_solution(problem, curvature, lam)
        facts[curvature] = {
            "negative_eigenvalues": int((evals < 0).sum()),
            "n": int(evals.numel()),
            "condition": float(evals.abs().max() / evals.abs().min().clamp_min(1e-300)),
            "lambda_min": float(evals[0]),
            "lambda_max": float(evals[-1]),
        }
        op_cls = HessianOperator if curvature == "hessian" else GGNOperator
        op = op_cls(problem.model, problem.loss_fn, problem.data)
        b = op.gradient()
        n = b.numel()
        for method in methods:
            if method in skips[curvature]:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x, mv, secs, hist, res = _run_method(method, op, b, lam, tol, n)
            finite = bool(torch.isfinite(x).all())
            rows.append(
                Row(
                    seed=seed,
                    curvature=curvature,
                    method=method,
                    cosine=cosine_similarity(x, exact) if finite else float("nan"),
                    relative_error=relative_error(x, exact) if finite else float("nan"),
                    matvecs=int(mv),
                    seconds=secs,
                    converged=None if res is None else bool(res.converged),
                    negative_curvature=None if res is None else bool(res.negative_curvature),
                    diverged=None if res is None else bool(res.diverged),
                    message="(seed notebook loop: no convergence check)"
                    if res is None
                    else res.message,
                    residuals=[h / max(float(b.norm()), 1e-300) for h in hist],
                )
            )
    return rows, facts


def run_compare(
    problem: str = "seed",
    seeds: Sequence[int] = range(5),
    dtype: torch.dtype = torch.float32,
    methods: Sequence[str] = DEFAULT_METHODS,
    hessian_damping: float = 0.0,
    ggn_damping: float = 1e-2,
    tol: float = 1e-6,
    progress: bool | None = None,
) -> tuple[list[Row], dict]:
    """Run the comparison over seeds; returns the rows and per-seed spectral facts.

    ``progress`` shows a bar over the seeds (``None``: the library's switch, see
    ``second._progress``).
    """
    rows, facts = [], {}
    seeds = list(seeds)
    for s in progress_bar(seeds, desc=f"compare[{problem}]", unit="seed", enabled=progress):
        r, f = compare_problem(
            problem, s, dtype, methods, {"hessian": hessian_damping, "ggn": ggn_damping}, tol
        )
        rows += r
        facts[s] = f
    return rows, facts


# ----------------------------------------------------------------------------- reporting
def jsonable(obj):
    """``obj`` with non-finite floats as ``None`` and keys as strings: strict JSON (RFC 8259).

    Example:
        >>> jsonable({1: [float("nan"), 2.0, (True, None)]})
        {'1': [None, 2.0, [True, None]]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return str(obj)


def _flag(values: list[bool | None]) -> str:
    if any(v is None for v in values):
        return "-"
    return f"{sum(bool(v) for v in values)}/{len(values)}"


def _status(values: list[bool | None]) -> str:
    """``"converged"`` on every seed, ``"NOT CONVERGED on k/n"``, or ``"unchecked"`` (no report)."""
    if any(v is None for v in values):
        return "unchecked"
    k = sum(bool(v) for v in values)
    return "converged" if k == len(values) else f"NOT CONVERGED on {len(values) - k}/{len(values)}"


def _median_worst(values: list[float], worst: float) -> float:
    """The median with NaN counted as ``worst`` (``-inf`` for a cosine, ``inf`` for an error).

    ``statistics.median`` sorts, and a list holding NaN sorts in no defined order: the median
    of ``[nan, 1.0, 0.01]`` came out as 0.01, the best seed's value.

    Example:
        >>> _median_worst([float("nan"), 1.0, 0.01], math.inf)
        1.0
    """
    return statistics.median(worst if math.isnan(v) else v for v in values)


def summarize(rows: list[Row]) -> list[dict]:
    """Aggregate rows over seeds: median/min cosine, median/max error, median cost.

    Each entry's ``status`` says whether its numbers can be trusted: ``"converged"`` (the
    method said it converged on every seed), ``"NOT CONVERGED on k/n"`` (it said it did not on
    ``k`` of ``n`` seeds: its cosine and error are those of an unfinished answer), or
    ``"unchecked"`` (the seed notebook's loops, which report nothing).

    A NaN cosine or error (a non-finite answer) counts as the worst value in every statistic:
    ``-inf`` for the cosine, ``inf`` for the error, so a median or an extreme over seeds that
    include one is never better than the finite seeds alone say (the tables print ``-inf`` /
    ``inf``, the README excerpt ``NaN``); ``nan_seeds`` counts such seeds.
    """
    out = []
    keys = []
    for r in rows:
        if (r.curvature, r.method) not in keys:
            keys.append((r.curvature, r.method))
    for curvature, method in keys:
        rs = [r for r in rows if r.curvature == curvature and r.method == method]
        cos = [r.cosine for r in rs]
        err = [r.relative_error for r in rs]
        out.append(
            {
                "curvature": curvature,
                "method": method,
                "cosine_median": _median_worst(cos, -math.inf),
                "cosine_min": min(-math.inf if math.isnan(c) else c for c in cos),
                "relerr_median": _median_worst(err, math.inf),
                "relerr_max": max(math.inf if math.isnan(e) else e for e in err),
                "nan_seeds": sum(math.isnan(c) or math.isnan(e) for c, e in zip(cos, err)),
                "matvecs_median": statistics.median(r.matvecs for r in rs),
                "ms_median": 1e3 * statistics.median(r.seconds for r in rs),
                "status": _status([r.converged for r in rs]),
                "converged": _flag([r.converged for r in rs]),
                "negative_curvature": _flag([r.negative_curvature for r in rs]),
                "diverged": _flag([r.diverged for r in rs]),
            }
        )
    return out


README_BEGIN = "<!-- compare:begin (scripts/update_readme.py writes this block) -->"
README_END = "<!-- compare:end -->"
LABELS = {
    "seed-cg": "the notebook's CG loop",
    "seed-neumann": "the notebook's Neumann loop",
    "cg": "`second.cg`",
    "minres": "`second.minres`",
    "minres-reorth": "`second.minres` (float64 recurrences, re-orthogonalized)",
    "neumann": "`second.neumann_solve`",
    "lissa": "`second.lissa`",
    "lowrank": "`second.lowrank`",
    "auto": "`second.solve` (`auto`)",
    "dense": "`second.dense`",
}


def _cosine_bucket(c: float) -> str:
    """A cosine rounded so that BLAS and thread counts do not change it."""
    if not math.isfinite(c):
        return "NaN"
    if c >= 0.99995:
        return "1.0000"
    for lo in (0.999, 0.99, 0.9, 0.5):
        if c >= lo:
            return f">= {lo:g}"
    return "< 0.5"


def readme_excerpt(summary: list[dict], ggn_damping: float = 1e-2) -> str:
    """The README's result table, from :func:`summarize` of the default ``second compare``.

    Cosines are bucketed (``1.0000``, ``>= 0.999``, ... ``< 0.5``, ``NaN``) so that the
    excerpt is the same on every machine; ``scripts/update_readme.py`` writes it and a test
    checks the README against a fresh run.
    """
    head = (
        "| matrix | method | status | cosine to exact (median / min) | says converged | "
        "says negative curvature / diverged |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for e in summary:
        matrix = "H" if e["curvature"] == "hessian" else f"G + {ggn_damping:g} I"
        cos = f"{_cosine_bucket(e['cosine_median'])} / {_cosine_bucket(e['cosine_min'])}"
        flags = []
        if e["negative_curvature"] not in ("-", "0/5") and e["negative_curvature"]:
            flags.append(f"{e['negative_curvature']} negative curvature")
        if e["diverged"] not in ("-",) and not str(e["diverged"]).startswith("0/"):
            flags.append(f"{e['diverged']} diverged")
        unchecked = e["status"] == "unchecked"
        lines.append(
            f"| {matrix} | {LABELS.get(e['method'], e['method'])} | {e['status']} | {cos} | "
            f"{'(no report)' if unchecked else e['converged']} | "
            f"{'(no report)' if unchecked else ', '.join(flags) or '-'} |"
        )
    return "\n".join(lines)


def format_table(summary: list[dict]) -> str:
    """A Markdown table of the summary.

    The ``status`` column comes before the numbers: a row that did not converge on every seed
    reads ``NOT CONVERGED on k/n`` and the seed notebook's loops read ``unchecked``, so no
    cosine is shown as if it were a solution.
    """
    head = (
        "| curvature | method | status | cosine (median / min) | rel. error (median / max) | "
        "matvecs | ms | converged | neg. curvature | diverged |"
    )
    lines = [head, "|" + "---|" * 10]
    for s in summary:
        lines.append(
            f"| {s['curvature']} | {s['method']} | {s['status']} | "
            f"{s['cosine_median']:.6f} / {s['cosine_min']:.6f} | "
            f"{s['relerr_median']:.2e} / {s['relerr_max']:.2e} | {s['matvecs_median']:.0f} | "
            f"{s['ms_median']:.1f} | {s['converged']} | {s['negative_curvature']} | {s['diverged']} |"
        )
    return "\n".join(lines)


def plot_residuals(rows: list[Row], path: Path, seed: int) -> None:
    """Relative residual vs products for each method on one seed (PNG).

    Raises:
        MissingExtraError: matplotlib is not installed (the ``plot`` extra).
    """
    matplotlib = require("matplotlib", extra="plot", purpose="the residual plot (compare.png)")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", extra="plot")

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, curvature in zip(axes, ("hessian", "ggn")):
        for r in rows:
            if r.seed != seed or r.curvature != curvature or len(r.residuals) < 2:
                continue
            ys = [max(v, 1e-16) if math.isfinite(v) else float("nan") for v in r.residuals]
            if r.method in ("auto", "dense", "lowrank"):  # direct: all products, then one answer
                xs, style = [1, max(r.matvecs, 1)], dict(ls="--", marker="o")
            else:  # one product per iteration, after any set-up (e.g. a Lanczos scale estimate)
                offset = max(r.matvecs - (len(ys) - 1), 0)
                xs, style = [i + max(offset, 1) for i in range(len(ys))], {}
            ax.loglog(xs, ys, label=r.method, lw=1.5, **style)
        title = (
            "Hessian H (indefinite)"
            if curvature == "hessian"
            else "damped Gauss-Newton G + lambda I"
        )
        ax.set_title(f"{title}, seed {seed}")
        ax.set_xlabel("curvature-vector products")
        ax.set_ylabel("relative residual ||b - A x|| / ||b||")
        ax.set_ylim(5e-17, 1e4)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rows: list[Row], facts: dict, out_dir: Path, plot: bool, header: str) -> str:
    """Write compare.md, compare.json and compare.png; return the Markdown report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    spectra = []
    for s, f in facts.items():
        h, g = f["hessian"], f["ggn"]
        spectra.append(
            f"- seed {s}: H has {h['negative_eigenvalues']} negative eigenvalues of {h['n']} "
            f"(lambda in [{h['lambda_min']:.3g}, {h['lambda_max']:.3g}], |cond| {h['condition']:.1e}); "
            f"damped G has lambda in [{g['lambda_min']:.3g}, {g['lambda_max']:.3g}]"
        )
    report = "\n".join([header, "", *spectra, "", format_table(summary), ""])
    (out_dir / "compare.md").write_text(report)
    (out_dir / "compare.json").write_text(
        json.dumps(
            jsonable({"summary": summary, "facts": facts, "rows": [asdict(r) for r in rows]}),
            indent=1,
            allow_nan=False,
        )
    )
    if plot:
        plot_residuals(rows, out_dir / "compare.png", seed=rows[0].seed)
    return report
