"""Checks that keep the ranks of a ``torch.distributed`` process group in step.

Two failure modes of data-parallel code are silent or slow without them:

* ranks that were meant to hold the same data hold different data: every rank computes
  its share correctly, and the gathered result is wrong (:func:`check_same_across_ranks`);
* one rank raises between two collectives while its peers wait in the next one, until
  the process group's timeout (:func:`failure_barrier`).

Both exchange one small integer tensor with ``all_reduce``, on ``device`` (the device
the caller's collectives use: CPU for gloo, the rank's GPU for NCCL).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["check_same_across_ranks", "failure_barrier", "all_ranks"]


def _digest_row(digest: str) -> list[int]:
    """A hex digest as integers of 24 bits (exact in int64)."""
    return [int(digest[i : i + 6] or "0", 16) for i in range(0, len(digest), 6)]


def check_same_across_ranks(what: str, digest: str, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank unless every rank passes the same ``digest``.

    Args:
        what: what the digest describes, for the message ("the training data").
        digest: a hex digest of the local value.
        device: where the exchanged tensor lives.

    Raises:
        ValueError: on every rank, naming the ranks whose digest differs from rank 0's.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    row = _digest_row(digest)
    table = torch.zeros(world, len(row), dtype=torch.int64, device=device)
    table[rank] = torch.tensor(row, dtype=torch.int64, device=device)
    dist.all_reduce(table)
    differ = [r for r in range(world) if not torch.equal(table[r], table[0])]
    if differ:
        raise ValueError(
            f"{what} differs between ranks: rank(s) {differ} hold other {what} than rank 0. "
            f"Every rank must pass the same {what}; the work, not the data, is split over ranks."
        )


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on every rank (e.g. every rank found a cached result).

    Ranks that take a collective path only when some local condition holds must agree on
    it first, or one of them waits alone in the collective until the timeout.
    """
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(int(t))


def _failed_ranks(failed: bool, device: torch.device) -> list[int]:
    rank, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int64, device=device)
    flags[rank] = int(failed)
    dist.all_reduce(flags)
    return [r for r in range(world) if int(flags[r])]


@contextmanager
def failure_barrier(phase: str, device: torch.device) -> Iterator[None]:
    """Run the local part of a collective phase, then let every rank learn whether any failed.

    Wrap the local work that precedes a collective (``all_reduce`` of partial results).
    On exit every rank exchanges a failure flag: a rank whose work raised re-raises its own
    error; the others raise ``RuntimeError`` naming the failed ranks instead of blocking
    in the next collective until the process group's timeout.

    Raises:
        RuntimeError: on the ranks that did not fail, when another rank did.
    """
    try:
        yield
    except BaseException:
        try:
            _failed_ranks(True, device)
        except Exception:  # the group itself is broken: the local error is the one to show
            pass
        raise
    failed = _failed_ranks(False, device)
    if failed:
        raise RuntimeError(
            f"{phase}: rank(s) {failed} raised an error (see that rank's output); rank "
            f"{dist.get_rank()} stops too instead of waiting for it in the next collective"
        )
