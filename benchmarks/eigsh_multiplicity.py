"""Repeated top eigenvalues: eigsh's default (one vector and a copy check) against block size 1
without the check and block k.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/eigsh_multiplicity.py [--cases 40]

Random 300 x 300 symmetric matrices (random eigenvectors, eigenvalues uniform in [0, 1)) whose top
m = 2, 3 or 4 eigenvalues are made equal (2.0; every fourth case a cluster 1 + 1e-12 i instead),
and k = m wanted: a single Krylov vector sees one vector of the repeated eigenspace, so a method
that stops once k values look converged can return the next distinct eigenvalue in place of a
copy. The default checks from a fresh vector (COPY_CHECK_STEPS Lanczos steps) before it stops;
the 1e-12 clusters sit on the continuum (no gap below them), where a check of a few steps
cannot see a copy. A case fails when a returned value is more than 2e-3 max|lambda| from torch.linalg.eigvalsh's.
Prints failures and products (matvecs) summed over the cases, per block size and criterion.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from second.spectral import eigsh


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
        for block in ("default", "1", "k"):
            for criterion, tol in (("residual", 1e-8), ("eigenvalue", 1e-3)):
                torch.manual_seed(seed)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    r = eigsh(
                        A,
                        k=m,
                        block_size={"default": None, "1": 1, "k": m}[block],
                        criterion=criterion,
                        tol=tol,
                        return_result=True,
                    )
                ev = r.eigenvalues.sort(descending=True).values
                bad = bool((ev - ref).abs().max() > 2e-3 * ref.abs().max())
                key = (block, criterion, "cluster" if seed % 4 == 0 else "exact")
                f, mv, c = out.get(key, (0, 0, 0))
                out[key] = (f + bad, mv + r.matvecs, c + 1)
    print(f"{cases} cases, k = multiplicity of the top eigenvalue (2-4)")
    print("| block size | criterion | copies | failed cases | products |")
    print("|---|---|---|---|---|")
    for (block, criterion, kind), (f, mv, c) in sorted(out.items()):
        print(f"| {block} | {criterion} | {kind} | {f} of {c} | {mv} |")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=40)
    main(p.parse_args().cases)
