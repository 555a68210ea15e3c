"""Regenerate the README's result block from `second compare` (the same code `make demo` runs).

    .venv/bin/python scripts/update_readme.py [--check]

With --check it exits 1 when the README's block differs from a fresh run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from second.compare import README_BEGIN, README_END, readme_excerpt, run_compare, summarize

README = Path(__file__).resolve().parents[1] / "README.md"


def fresh_block() -> str:
    """The result block from a fresh default `second compare` run."""
    rows, _ = run_compare(progress=False)
    return readme_excerpt(summarize(rows))


def replace_block(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    start, end = text.index(README_BEGIN), text.index(README_END)
    return text[: start + len(README_BEGIN)] + "\n" + block + "\n" + text[end:]


def current_block(text: str) -> str:
    """The block between the markers."""
    start, end = text.index(README_BEGIN), text.index(README_END)
    return text[start + len(README_BEGIN) : end].strip()


def main(argv=None) -> int:
    """Write (or with --check, compare) the README block."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = README.read_text()
    block = fresh_block()
    if args.check:
        if current_block(text) != block:
            print("README.md's result block differs from a fresh run:\n" + block)
            return 1
        print("README.md's result block matches a fresh run")
        return 0
    README.write_text(replace_block(text, block))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
