"""Repeated top eigenvalues: eigsh's default (a block as wide as k) against one vector with and
without the copy check.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eigsh_multiplicity.py [--cases 40] [--gaps]

Random 300 x 300 symmetric matrices (random eigenvectors, eigenvalues uniform in [0, 1)) whose top
m = 2, 3 or 4 eigenvalues are made equal (2.0; every fourth case a cluster 1 + 1e-12 i instead),
and k = m wanted: a single Krylov vector sees one vector of the repeated eigenspace, so a method
that stops once k values look converged can return the next distinct eigenvalue in place of a
copy. With one vector eigsh checks from a fresh vector (COPY_CHECK_STEPS Lanczos steps) before
it stops; the 1e-12 clusters sit on the continuum (no gap below them), where a check of a few
steps cannot see a copy. The default block, as wide as k, sees them. A case fails when a returned value is more than 2e-3 max|lambda| from torch.linalg.eigvalsh's.
Prints failures and products (matvecs) summed over the cases, per block size and criterion.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from second.spectral import _eigsh, eigsh

CHECK = _eigsh.COPY_CHECK_STEPS


def main(cases: int = 40) -> dict:
    """Run the cases; return {(block, criterion, kind): (failures, matvecs, cases)}."""
    out: dict = {}
    for seed in range(cases):
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64, generator=g))
        d = torch.rand(300, dtype=torch.float64, generator=g)
        m = 2 + seed % 3
        d[:m] = 1.0 + 1e-12 * torch.arange(m) if seed % 4 == 0 else 2.0
        A = Q @ torch.diag(d) @ Q.T
        ref = torch.linalg.eigvalsh(A).flip(0)[:m]
        for block in ("default (k)", "1 + check", "1 plain"):
            for criterion, tol in (("residual", 1e-8), ("eigenvalue", 1e-3)):
                torch.manual_seed(seed)
                _eigsh.COPY_CHECK_STEPS = 0 if block == "1 plain" else CHECK
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = eigsh(
                        A,
                        k=m,
                        block_size=None if block.startswith("default") else 1,
                        criterion=criterion,
                        tol=tol,
                        return_result=True,
                    )
                ev = r.eigenvalues.sort(descending=True).values
                bad = bool((ev - ref).abs().max() > 2e-3 * ref.abs().max())
                key = (block, criterion, "cluster" if seed % 4 == 0 else "exact")
                f, mv, c = out.get(key, (0, 0, 0))
                out[key] = (f + bad, mv + r.matvecs, c + 1)
    _eigsh.COPY_CHECK_STEPS = CHECK
    print(f"{cases} cases, k = multiplicity of the top eigenvalue (2-4)")
    print("| block size | criterion | copies | failed cases | products |")
    print("|---|---|---|---|---|")
    for (block, criterion, kind), (f, mv, c) in sorted(out.items()):
        print(f"| {block} | {criterion} | {kind} | {f} of {c} | {mv} |")
    return out


def gaps(cases: int = 10) -> dict:
    """Copies a small gap above a continuum: top = 1 + gap, the rest linspace(0, 1), n = 200."""
    out: dict = {}
    n = 200
    for gap in (0.05, 0.1, 0.2, 0.5):
        for mult in (2, 3):
            for block in ("default (k)", "1 + check"):
                miss = mv = 0
                for seed in range(cases):
                    g = torch.Generator().manual_seed(seed)
                    d = torch.cat(
                        [
                            torch.full((mult,), 1 + gap, dtype=torch.float64),
                            torch.linspace(0, 1, n - mult, dtype=torch.float64),
                        ]
                    )
                    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
                    A = Q @ torch.diag(d) @ Q.T
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        r = eigsh(
                            0.5 * (A + A.T),
                            k=mult,
                            block_size=None if block.startswith("default") else 1,
                            return_result=True,
                            generator=torch.Generator().manual_seed(seed),
                        )
                    miss += bool((r.eigenvalues - (1 + gap)).abs().max() > 1e-4)
                    mv += r.matvecs
                out[(gap, mult, block)] = (miss, mv)
    print(f"| gap | copies | method | missed (of {cases}) | products |")
    print("|---|---|---|---|---|")
    for (gap, mult, block), (miss, mv) in out.items():
        print(f"| {gap} | {mult} | {block} | {miss} | {mv} |")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=40)
    p.add_argument("--gaps", action="store_true", help="copies a small gap above a continuum")
    args = p.parse_args()
    gaps() if args.gaps else main(args.cases)
