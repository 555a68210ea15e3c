"""How an Influence shares its work over a torch.distributed process group."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from torch import Tensor

from .. import distributed as dist
from ..distributed import check_same_across_ranks, failure_barrier

__all__ = ["ShardedWork"]


class ShardedWork:
    """Rank-sharded loops for :class:`~second.Influence`: chunk ``c`` is rank ``c % world``'s.

    Every rank computes its share into a zero-filled result that :meth:`_gather` sums; a
    rank that raises makes the others raise (:meth:`_collective`). The host sets
    ``_distributed`` (the user's setting), ``progressbar`` and ``fn.device``.
    """

    _distributed: bool | None
    progressbar: bool
    batch_size: int

    # -- distributed -----------------------------------------------------------------------
    def _dist(self) -> tuple[bool, int, int]:
        if not dist.active(self._distributed):
            return False, 0, 1
        return True, dist.rank(), dist.world_size()

    def _mine(self, c: int) -> bool:
        _, r, w = self._dist()
        return c % w == r

    def _gather(self, t: Tensor) -> Tensor:
        """Sum a zero-filled partial result over ranks (each entry is filled by one rank)."""
        if self._dist()[0]:
            dist.all_reduce_sum(t)
        return t

    def _collective(self, phase: str):
        """Around a rank's share of the work: if any rank raises, every rank raises."""
        if not self._dist()[0]:
            return nullcontext()
        return failure_barrier(phase, self.fn.device)

    def _each_chunk(self, examples, desc: str, body: Callable[[int, int, Any], None]) -> None:
        """``body(c, start, chunk)`` on this rank's chunks of ``examples``, under a progress bar.

        The loop runs inside :meth:`_collective`: if any rank raises, every rank raises.
        """
        total = examples.n_chunks(self.batch_size)
        with self._collective(desc):
            for c, s, chunk in self._bar(examples.chunks(self.batch_size), total, desc):
                if self._mine(c):
                    body(c, s, chunk)

    def _same_on_all_ranks(self, what: str, digest: str) -> None:
        if self._dist()[0]:
            check_same_across_ranks(what, digest, self.fn.device)

    def _bar(self, it, total: int, desc: str):
        _, r, _ = self._dist()
        if self.progressbar is False or r != 0:
            return it
        from .._progress import progress

        return progress(it, total=total, desc=desc, unit="batch", enabled=self.progressbar)
