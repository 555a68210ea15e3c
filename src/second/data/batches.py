"""Data passes: how ``second`` reads one batch, an iterable of batches or a ``Dataset``.

**Data** is one batch, an iterable of batches (a ``DataLoader``, a list), or a map-style
``torch.utils.data.Dataset`` (read in order, :attr:`Task.dataset_batch_size` examples at a
time). The curvature operators and :class:`~second.Influence` read data through
:func:`iterate_batches` (every batch checked by the :class:`Task`, empty ones skipped);
:func:`batch_count` says how many batches a pass reads, and :func:`refuse_one_shot` refuses
data that a second pass would find empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from .task import Task

__all__ = ["iterate_batches", "batch_count", "refuse_one_shot"]


def refuse_one_shot(data, what: str) -> None:
    """Raise unless ``data`` can be read more than once (a one-shot iterator cannot).

    A generator, ``zip(...)``, ``map(...)`` or ``iter(loader)`` is exhausted by the first
    pass, and an object that reads its data on every product needs a second pass.

    Args:
        data: the data given to ``what``.
        what: who reads the data, for the message.

    Raises:
        TypeError: ``data`` is an iterator (``iter(data) is data``).

    Example:
        >>> refuse_one_shot([(torch.ones(2, 1), torch.ones(2))], "an operator")
        >>> refuse_one_shot(iter([]), "an operator")
        Traceback (most recent call last):
            ...
        TypeError: an operator reads the data on every pass, but it was given a one-shot iterator (list_iterator), which is empty after the first pass: pass a list of batches, a DataLoader or a Dataset instead (e.g. list(data))
    """
    if isinstance(data, Iterator):
        raise TypeError(
            f"{what} reads the data on every pass, but it was given a one-shot iterator "
            f"({type(data).__name__}), which is empty after the first pass: pass a list of "
            "batches, a DataLoader or a Dataset instead (e.g. list(data))"
        )


def batch_count(data, task: Task) -> int | None:
    """How many batches :func:`iterate_batches` reads from ``data`` (``None``: unknown).

    One for a single batch, ``ceil(len / task.dataset_batch_size)`` for a map-style
    ``Dataset`` (read in batches of that size), ``len(data)`` for another sized iterable.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> batch_count(TensorDataset(torch.ones(1000, 2), torch.ones(1000)), Task())
        4
    """
    if task.is_batch(data):
        return 1
    if _is_map_dataset(data):
        try:
            n = len(data)
        except TypeError:
            return None
        return -(-n // task.dataset_batch_size)
    return len(data) if hasattr(data, "__len__") else None


def _is_map_dataset(data) -> bool:
    from torch.utils.data import Dataset, IterableDataset

    return isinstance(data, Dataset) and not isinstance(data, IterableDataset)


def _batches_of(data, task: Task) -> Iterable:
    if task.is_batch(data):
        return [data]
    if _is_map_dataset(data):
        from torch.utils.data import DataLoader

        return DataLoader(data, batch_size=task.dataset_batch_size, shuffle=False)
    try:
        return iter(data)
    except TypeError:
        raise TypeError(
            "data must be an (X, y) batch of tensors, a dict of tensors, an iterable of such "
            f"batches or a map-style Dataset, got {type(data).__name__}"
        ) from None


def iterate_batches(
    data,
    task: Task | None = None,
    device: torch.device | None = None,
    *,
    allow_empty: bool = False,
) -> Iterator:
    """Yield the non-empty batches of ``data``, checked and moved to ``device``.

    Args:
        data: one batch, an iterable of batches, or a map-style ``Dataset``.
        task: how to read a batch (default :class:`Task`).
        device: where to move every tensor (``None``: leave them).
        allow_empty: yield nothing for data without an example instead of raising (a
            rank's shard of distributed data may be empty while the union is not; the
            caller checks the reduced count).

    Yields:
        The batches, in order; empty ones are skipped.

    Raises:
        TypeError: ``data`` is not data, or a batch has a layout the task cannot read.
        ValueError: a batch's tensors disagree on the number of examples, or the data
            holds no example at all.

    Example:
        >>> X, y = torch.randn(5, 2), torch.randn(5)
        >>> [b[0].shape[0] for b in iterate_batches([(X[:3], y[:3]), (X[3:], y[3:])])]
        [3, 2]
    """
    task = task if task is not None else Task()
    count = 0
    for batch in _batches_of(data, task):
        task.check(batch)
        if task.batch_size(batch) == 0:
            continue
        count += 1
        yield task.to(batch, device)
    if count == 0 and not allow_empty:
        raise ValueError("the data is empty: it yielded no (non-empty) batch")
