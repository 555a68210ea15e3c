"""The examples influence is computed over: one batch, an iterable of batches, chunked."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from .._errors import outside_stacklevel
from .._losses import class_target_weights
from ..data import SamePassCheck, Task, iterate_batches, tensor_leaves
from ..func.per_example import ModelFunction
from ._cache import fingerprint

__all__ = ["Examples", "warn_ignored", "example_mean_weights", "zero_rows"]


def example_mean_weights(loss_fn, target, n: int) -> Tensor | None:
    r"""Each example's weight :math:`W_j` in torch's ``reduction="mean"``, ``[n]`` float64.

    What the mean of a batch divides by is :math:`W_b = \sum_{j \in b} W_j`
    (``second.operators.curvature.mean_weight``): for ``CrossEntropyLoss``/``NLLLoss`` with
    class indices the class weights of the example's valid targets (``ignore_index``
    excluded: the number of valid targets without ``weight=``), with class probabilities
    its number of positions. ``None`` for any other loss: every example weighs 1.
    """
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or not isinstance(target, Tensor):
        return None
    if n == 0:
        return torch.zeros(0, dtype=torch.float64)
    if target.is_floating_point():  # class probabilities [n, C, *positions]
        positions = target[0].numel() // target.shape[1] if target.dim() > 1 else 1
        return torch.full((n,), float(positions), dtype=torch.float64)
    dtype = torch.float32 if target.device.type == "mps" else torch.float64
    weights = class_target_weights(loss_fn, target, target.new_empty(0, dtype=dtype))
    if weights is None:  # every target valid, no class weights: the positions count
        return torch.full((n,), float(target[0].numel()), dtype=torch.float64)
    return weights[1].reshape(n, -1).sum(1).to(device="cpu", dtype=torch.float64)


class Examples:
    """A dataset of examples read through a :class:`~second.Task`, in a fixed order.

    Results are indexed by example, so an iterable must yield the same batches in the same
    order on every pass: every pass after the first is checked against it
    (:class:`~second.data.SamePassCheck`, order-sensitive), and a shuffling ``DataLoader``
    raises :class:`~second.NonDeterministicDataError`. A single in-memory batch is watched
    through its tensors' autograd version counters instead (:meth:`changed`).

    ``mean_weights`` holds each example's weight :math:`W_j` in torch's mean of the loss
    (:func:`example_mean_weights`; ``None`` for a loss other than cross-entropy or NLL:
    every example weighs 1), and ``ignored`` the examples of weight zero: every target
    equal to ``ignore_index``, or of class weight 0.

    Args:
        data: one batch, an iterable of batches, or a map-style ``Dataset``.
        what: how the data is named in messages ("training data").
        task: how to read a batch.
        device: where chunks and examples are moved.
        loss_fn: the loss (``None``: the task's), which gives the weights.

    Raises:
        ValueError: the data holds no example, or a batch's tensors disagree on its size.
        TypeError: a batch the task cannot read.
    """

    def __init__(self, data, what: str, task: Task, device: torch.device, loss_fn=None):
        self.what, self.task, self.device = what, task, device
        loss = task.loss_fn if task.loss_fn is not None else loss_fn
        self.ignore_index = getattr(loss, "ignore_index", None)
        weighs = isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss))
        self.single = task.is_batch(data)
        self.data = data
        self._check = SamePassCheck(
            what,
            "Influence results are indexed by example: pass the data in a fixed order "
            "(DataLoader(shuffle=False), a list of batches).",
            ordered=True,
        )
        n, first, sizes = 0, None, []
        weights: list[Tensor | None] = []
        try:
            for batch in self._batches():
                nb = task.batch_size(batch)
                sizes.append(nb)
                if first is None:
                    first = _example_shapes(batch)
                weights.append(
                    example_mean_weights(loss, task.targets(batch), nb) if weighs else None
                )
                n += nb
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from None
        self.n = n
        self.sizes = sizes
        self.example_shapes = first
        self.mean_weights: Tensor | None = None
        if any(w is not None for w in weights):
            self.mean_weights = torch.cat(
                [
                    torch.ones(nb, dtype=torch.float64) if w is None else w
                    for w, nb in zip(weights, sizes)
                ]
            )
        self.ignored: list[int] = (
            [] if self.mean_weights is None else (self.mean_weights == 0).nonzero()[:, 0].tolist()
        )
        self._versions = self._tensor_versions()

    def _tensor_versions(self) -> tuple | None:
        """A single batch's tensors (their ids) and autograd version counters."""
        if not self.single:
            return None
        return tuple((id(t), t._version) for t in tensor_leaves(self.data))

    def changed(self) -> bool:
        """Whether a single batch's tensors were changed in place since they were read.

        In-place torch operations bump a tensor's version counter; writes through
        ``.data`` or a NumPy view do not, and are not seen (call ``refresh()`` then).
        An iterable of batches is checked on every pass instead (its batches must not
        change at all).
        """
        return self.single and self._tensor_versions() != self._versions

    def zero_weight(self, start: int, stop: int) -> Tensor | None:
        """A ``[stop - start]`` mask of the examples of weight zero there (``None``: none)."""
        if not self.ignored or self.mean_weights is None:
            return None
        mask = self.mean_weights[start:stop] == 0
        return mask if bool(mask.any()) else None

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


def _ranks(shapes):
    """The layout of :func:`_example_shapes`: dimensions only."""
    if isinstance(shapes, tuple) and all(isinstance(d, int) for d in shapes):
        return len(shapes)
    if isinstance(shapes, (tuple, list)):
        return tuple(_ranks(x) for x in shapes)
    return shapes


def _gradients(fn: ModelFunction, chunk) -> Tensor:
    """Per-example gradients of a chunk; a pair as ``fn.gradients(X, y)``, as it always was."""
    if isinstance(chunk, (tuple, list)) and len(chunk) == 2:
        return fn.gradients(*chunk)
    return fn.gradients(chunk)


def warn_ignored(examples: Examples, loss_fn) -> None:
    """Warn that examples of weight zero in the loss' mean (ignored targets) have no influence."""
    if examples.ignored:
        k = len(examples.ignored)
        warnings.warn(
            f"{k} {examples.what} example(s) (first: {examples.ignored[:10]}) have every target "
            f"equal to the loss' ignore_index ({examples.ignore_index}) or of class weight 0: "
            "their loss is ignored, so their gradient and every influence score involving "
            "them are zero",
            UserWarning,
            stacklevel=outside_stacklevel(),
        )


def zero_rows(G: Tensor, mask: Tensor | None) -> Tensor:
    """``G`` with the rows of ``mask`` set to zero (their NaN too; ``None``: unchanged)."""
    if mask is None:
        return G
    m = mask.to(G.device).reshape(-1, *([1] * (G.dim() - 1)))
    return torch.where(m, torch.zeros((), dtype=G.dtype, device=G.device), G)
