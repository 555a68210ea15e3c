"""Memory measurement shared by the benchmarks (Linux: reads /proc)."""

from __future__ import annotations


def rss() -> int:
    """The resident memory of this process now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
