"""Run the examples for the documentation's gallery (``make docs`` calls this first).

Each example runs in a quick setting, its last lines of output go to
``docs/gallery/_generated/<name>.txt`` and its figure, if it makes one, to ``<name>.png``.
A failing example fails the docs build.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "_generated"

# name -> arguments: quick versions that keep the docs build short
EXAMPLES = {
    "influence_digits": ["--out", "{png}"],
    "hyperparameter_weight_decay": ["--outer-steps", "15", "--out", "{png}"],
    "imaml_sinusoid": [
        "--outer-steps",
        "300",
        "--eval-every",
        "100",
        "--eval-tasks",
        "100",
        "--out",
        "{png}",
    ],
    "kfac_autoencoder": ["--max-iters", "300"],
}


def main() -> int:
    """Run every example; 0 when all succeeded."""
    OUT.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    for name, args in EXAMPLES.items():
        png = OUT / f"{name}.png"
        cmd = [sys.executable, str(ROOT / "examples" / f"{name}.py")]
        cmd += [a.format(png=png) for a in args]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        secs = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stdout, r.stderr, sep="\n", file=sys.stderr)
            print(f"gallery: {name} failed (exit {r.returncode})", file=sys.stderr)
            return 1
        tail = r.stdout.strip().splitlines()[-15:]
        shown = " ".join(["python", f"examples/{name}.py", *args]).replace("{png}", f"{name}.png")
        (OUT / f"{name}.txt").write_text("\n".join([f"$ {shown}", *tail, ""]))
        print(f"gallery: {name} ({secs:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
