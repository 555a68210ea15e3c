r"""The ``torch.distributed`` seams of ``second``: one owner for every collective.

Every function does nothing (or returns the single-process answer) when no process group
is initialized, so code written for data parallelism runs unchanged on one process:

* :func:`active`, :func:`rank`, :func:`world_size`, :func:`is_main`: where this process
  stands (``False``, ``0``, ``1``, ``True`` outside a process group);
* :func:`all_reduce_sum`, :func:`all_gather`: the reductions
  (:math:`\sum_r t_r` and :math:`[t_0, \dots, t_{W-1}]` over the ``W`` ranks);
* :func:`check_same_across_ranks`, :func:`all_ranks`, :func:`failure_barrier`: checks that
  keep the ranks in step. Two failure modes of data-parallel code are silent or slow
  without them: ranks that were meant to hold the same data hold different data (every
  rank computes its share correctly and the gathered result is wrong), and one rank
  raises between two collectives while its peers wait in the next one until the process
  group's timeout.

The checks exchange one small integer tensor with ``all_reduce``, on ``device`` (the device
the caller's collectives use: CPU for gloo, the rank's GPU for NCCL).

Example:
    >>> import torch
    >>> active(), rank(), world_size(), is_main()        # no process group here
    (False, 0, 1, True)
    >>> all_reduce_sum(torch.ones(2))
    tensor([1., 1.])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import overload

import torch
import torch.distributed as dist
from torch import Tensor

from .func.vectors import parameters_to_vector, vector_to_parameters

__all__ = [
    "active",
    "rank",
    "world_size",
    "is_main",
    "all_reduce_sum",
    "all_gather",
    "check_same_across_ranks",
    "check_same_values_across_ranks",
    "collective_operator",
    "all_ranks",
    "failure_barrier",
]


def active(distributed: bool | None = None) -> bool:
    """Whether collectives run: a process group is initialized and the caller allows it.

    Args:
        distributed: the caller's setting: ``None`` (default) follows the process group,
            ``False`` keeps everything local, ``True`` requires a process group.

    Returns:
        ``True`` when a process group is initialized and ``distributed`` is not ``False``.

    Raises:
        RuntimeError: ``distributed=True`` without an initialized process group.

    Example:
        >>> active(), active(False)
        (False, False)
    """
    if distributed is False:
        return False
    on = dist.is_available() and dist.is_initialized()
    if distributed and not on:
        raise RuntimeError("distributed=True but no torch.distributed process group is initialized")
    return on


def rank() -> int:
    """The rank of this process in the default group (``0`` without a process group).

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the default group (``1`` without a process group).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this is rank 0 (always ``True`` without a process group).

    Example:
        >>> is_main()
        True
    """
    return rank() == 0


@overload
def all_reduce_sum(tensors: Tensor, distributed: bool | None = None) -> Tensor: ...


@overload
def all_reduce_sum(tensors: Sequence[Tensor], distributed: bool | None = None) -> list[Tensor]: ...


def all_reduce_sum(
    tensors: Tensor | Sequence[Tensor], distributed: bool | None = None
) -> Tensor | list[Tensor]:
    r"""Sum over ranks, in place: :math:`t \leftarrow \sum_r t_r` (one collective).

    Several tensors are packed into one buffer, so the reduction is a single ``all_reduce``.

    Args:
        tensors: a tensor, or a sequence of tensors of one dtype and device.
        distributed: as in :func:`active`.

    Returns:
        The same tensor(s), now holding the sums (unchanged outside a process group).

    Raises:
        RuntimeError: ``distributed=True`` without a process group.

    Example:
        >>> a, b = all_reduce_sum([torch.ones(2), torch.zeros(1)])
        >>> a, b
        (tensor([1., 1.]), tensor([0.]))
    """
    single = isinstance(tensors, Tensor)
    ts: list[Tensor] = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if active(distributed) and ts:
        if len(ts) == 1:
            dist.all_reduce(ts[0])
        else:
            buf = parameters_to_vector(ts)
            dist.all_reduce(buf)
            for t, part in zip(ts, vector_to_parameters(buf, ts), strict=True):
                t.copy_(part)
    return ts[0] if single else ts


def all_gather(t: Tensor, distributed: bool | None = None) -> Tensor:
    """Stack every rank's ``t`` (same shape on every rank) along a new first dimension.

    Args:
        t: this rank's tensor.
        distributed: as in :func:`active`.

    Returns:
        A ``[world_size, *t.shape]`` tensor, ordered by rank (``t[None]`` on one process).

    Example:
        >>> all_gather(torch.tensor([1.0, 2.0]))
        tensor([[1., 2.]])
    """
    if not active(distributed):
        return t.unsqueeze(0)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def _digest_row(digest: str) -> list[int]:
    """A hex digest as integers of 24 bits (exact in int64)."""
    return [int(digest[i : i + 6] or "0", 16) for i in range(0, len(digest), 6)]


def check_same_across_ranks(
    what: str, digest: str, device: torch.device, hint: str | None = None
) -> None:
    """Raise ``ValueError`` on every rank unless every rank passes the same ``digest``.

    A no-op without a process group.

    Args:
        what: what the digest describes, for the message ("the training data").
        digest: a hex digest of the local value.
        device: where the exchanged tensor lives.
        hint: what the user should do, ending the message (default: every rank passes
            the same value, the work is split over ranks).

    Raises:
        ValueError: on every rank, naming the ranks whose digest differs from rank 0's.

    Example:
        >>> check_same_across_ranks("the data", "ab12", torch.device("cpu"))  # one process
    """
    if not active():
        return
    r, world = dist.get_rank(), dist.get_world_size()
    row = _digest_row(digest)
    table = torch.zeros(world, len(row), dtype=torch.int64, device=device)
    table[r] = torch.tensor(row, dtype=torch.int64, device=device)
    dist.all_reduce(table)
    differ = [i for i in range(world) if not torch.equal(table[i], table[0])]
    if differ:
        raise ValueError(
            f"{what} differs between ranks: rank(s) {differ} hold other {what} than rank 0. "
            + (
                hint
                if hint is not None
                else f"Every rank must pass the same {what}; the work, not the data, is split "
                "over ranks."
            )
        )


def collective_operator(op, depth: int = 0) -> bool:
    """Whether ``op``'s products are all-reduced over a process group (through wrappers).

    A curvature operator over data under an initialized process group (unless built with
    ``distributed=False``), or a wrapper (a sum, a damped or scaled operator) of one.
    """
    from .operators.base import LinearOperator

    if depth > 16 or not active():
        return False
    if hasattr(op, "distributed") and hasattr(op, "model"):  # a curvature operator over data
        return op.distributed is not False
    inner = [*getattr(op, "ops", ()), getattr(op, "op", None)]
    return any(collective_operator(o, depth + 1) for o in inner if isinstance(o, LinearOperator))


def check_same_values_across_ranks(what: str, op, *values, hint: str) -> None:
    """Raise ``ValueError`` on every rank unless the ranks pass the same ``values``.

    Only for an operator whose products are summed over the ranks
    (:func:`collective_operator`): every rank then computes the same answer from the same
    inputs (right-hand sides, starting vectors, random generators), and an input that
    differs per rank (a local gradient, a generator seeded with the rank) would give each
    rank a wrong answer of its own. A no-op otherwise. Costs one small ``all_reduce``.

    Args:
        what: what the values are, for the message ("b", "the generator's state").
        op: the operator.
        values: tensors, generators (their state), numbers or ``None``.
        hint: what the user should do, ending the message.
    """
    if not collective_operator(op):
        return
    import hashlib

    h = hashlib.sha256()
    for v in values:
        if isinstance(v, torch.Generator):
            v = v.get_state()
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"R{type(v).__name__}:{v!r};".encode())
    check_same_across_ranks(what, h.hexdigest()[:24], op.device, hint)


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on every rank (e.g. every rank found a cached result).

    Ranks that take a collective path only when some local condition holds must agree on
    it first, or one of them waits alone in the collective until the timeout.

    Args:
        flag: the local condition.
        device: where the exchanged tensor lives.

    Returns:
        The logical AND of ``flag`` over ranks (``flag`` itself on one process).

    Example:
        >>> all_ranks(True, torch.device("cpu"))
        True
    """
    if not active():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(int(t))


def _failed_ranks(failed: bool, device: torch.device) -> list[int]:
    r, world = dist.get_rank(), dist.get_world_size()
    flags = torch.zeros(world, dtype=torch.int64, device=device)
    flags[r] = int(failed)
    dist.all_reduce(flags)
    return [i for i in range(world) if int(flags[i])]


@contextmanager
def failure_barrier(phase: str, device: torch.device) -> Iterator[None]:
    """Run the local part of a collective phase, then let every rank learn whether any failed.

    Wrap the local work that precedes a collective (``all_reduce`` of partial results).
    On exit every rank exchanges a failure flag: a rank whose work raised re-raises its own
    error; the others raise ``RuntimeError`` naming the failed ranks instead of blocking
    in the next collective until the process group's timeout. Without a process group it
    only runs the body.

    Args:
        phase: what the ranks were doing, for the message.
        device: where the exchanged tensor lives.

    Raises:
        RuntimeError: on the ranks that did not fail, when another rank did.

    Example:
        >>> with failure_barrier("a phase", torch.device("cpu")):
        ...     x = 1
    """
    if not active():
        yield
        return
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
