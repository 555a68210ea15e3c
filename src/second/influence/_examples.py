"""The examples influence is computed over: one batch, an iterable of batches, chunked."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from ..data import SamePassCheck, Task, iterate_batches
from ._cache import fingerprint

__all__ = ["Examples", "warn_ignored"]


class Examples:
    """A dataset of examples read through a :class:`~second.Task`, in a fixed order.

    Results are indexed by example, so an iterable must yield the same batches in the same
    order on every pass: every pass after the first is checked against it
    (:class:`~second.data.SamePassCheck`, order-sensitive), and a shuffling ``DataLoader``
    raises :class:`~second.NonDeterministicDataError`. ``ignored`` lists the examples whose
    every target equals ``ignore_index``.

    Args:
        data: one batch, an iterable of batches, or a map-style ``Dataset``.
        what: how the data is named in messages ("training data").
        task: how to read a batch.
        device: where chunks and examples are moved.
        ignore_index: the loss' ``ignore_index`` (``None``: none).

    Raises:
        ValueError: the data holds no example, or a batch's tensors disagree on its size.
        TypeError: a batch the task cannot read.
    """

    def __init__(
        self, data, what: str, task: Task, device: torch.device, ignore_index: int | None = None
    ):
        self.what, self.task, self.device = what, task, device
        self.single = task.is_batch(data)
        self.data = data
        self._check = SamePassCheck(
            what,
            "Influence results are indexed by example: pass the data in a fixed order "
            "(DataLoader(shuffle=False), a list of batches).",
            ordered=True,
        )
        n, first, ignored, sizes = 0, None, [], []
        try:
            for batch in self._batches():
                nb = task.batch_size(batch)
                sizes.append(nb)
                if first is None:
                    first = _example_shapes(batch)
                if ignore_index is not None and nb:
                    y = task.targets(batch)
                    if not y.is_floating_point():
                        mask = (y == ignore_index).reshape(nb, -1).all(1)
                        ignored += (torch.nonzero(mask).reshape(-1) + n).tolist()
                n += nb
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        self.n = n
        self.sizes = sizes
        self.example_shapes = first
        self.ignored = ignored

    def _batches(self) -> Iterator:
        it = iterate_batches(self.data, self.task)
        yield from (it if self.single else self._check(it))

    def chunks(self, size: int) -> Iterator[tuple[int, int, object]]:
        """``(chunk_index, start, batch)`` with at most ``size`` examples, on the device."""
        c, start = 0, 0
        for batch in self._batches():
            nb = self.task.batch_size(batch)
            for s in range(0, nb, size):
                sl = slice(s, min(s + size, nb))
                yield c, start, self.task.to(self.task.take(batch, sl), self.device)
                c += 1
                start += sl.stop - sl.start

    def n_chunks(self, size: int) -> int:
        """How many chunks :meth:`chunks` yields for ``size``."""
        return sum(-(-nb // size) for nb in self.sizes)

    def take(self, indices: Sequence[int]) -> list:
        """Return the examples at ``indices`` as batches of one, on the device."""
        want = {int(i): None for i in indices}
        start = 0
        for batch in self._batches():
            nb = self.task.batch_size(batch)
            for i in want:
                if start <= i < start + nb:
                    one = self.task.take(batch, slice(i - start, i - start + 1))
                    want[i] = self.task.to(one, self.device)
            start += nb
        return [want[int(i)] for i in indices]

    def digest(self, size: int) -> str:
        """A SHA-256 digest of every example, in order."""
        return fingerprint([chunk for _, _, chunk in self.chunks(size)])


def _example_shapes(batch) -> tuple:
    """The shapes of one example's tensors (every tensor's shape without the batch size)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        X, y = batch
        xs = tuple(X.shape[1:]) if isinstance(X, torch.Tensor) else tuple(t.shape[1:] for t in X)
        return xs, tuple(y.shape[1:])
    if isinstance(batch, dict):
        return tuple((k, tuple(v.shape[1:])) for k, v in batch.items())
    return ()


def warn_ignored(examples: Examples, loss_fn) -> None:
    """Warn that examples whose every target is the loss' ``ignore_index`` have no influence."""
    if examples.ignored:
        k = len(examples.ignored)
        warnings.warn(
            f"{k} {examples.what} example(s) (first: {examples.ignored[:10]}) have every target "
            f"equal to the loss' ignore_index ({loss_fn.ignore_index}): their loss is ignored, "
            "so their gradient and every influence score involving them are zero",
            UserWarning,
            stacklevel=3,
        )
