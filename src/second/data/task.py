r"""What a batch is, and how ``second`` runs a model on one: :class:`Task`.

A **batch** is whatever the data yields: an ``(X, y)`` pair of tensors (``X`` may be a
tuple of tensors for a model with several inputs), a dict of tensors (the HuggingFace
style, targets under ``"labels"``), or anything else a :class:`Task` knows how to run.
The curvature operators and :class:`~second.Influence` run the model through a
:class:`Task`. With the default task,

.. math:: L_b(\theta) = \texttt{loss\_fn}(f_\theta(X_b), y_b)

for a pair, and ``loss_fn(model(**inputs), batch["labels"])`` for a dict, so simple users
never write one. :func:`tensor_leaves` and :func:`map_batch` read and rebuild a batch of any
nesting; :func:`call_model` calls a model on inputs of any layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._losses import sample_targets

__all__ = ["Task", "tensor_leaves", "call_model", "as_task", "map_batch"]


def tensor_leaves(batch) -> list[Tensor]:
    """Every tensor in a batch (tuples, lists and dicts, recursively), in order."""
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in tensor_leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in tensor_leaves(v)]
    return []


def call_model(module: Callable, inputs: Any, params: dict[str, Tensor] | None = None) -> Any:
    """``module(inputs)``, ``module(*inputs)`` for a tuple or list, ``module(**inputs)`` for a dict.

    With ``params`` (names to tensors), by :func:`torch.func.functional_call` with those
    parameters in place of the module's.

    Example:
        >>> call_model(torch.nn.Bilinear(2, 3, 1), (torch.ones(4, 2), torch.ones(4, 3))).shape
        torch.Size([4, 1])
    """
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args = tuple(inputs)
    else:
        args = (inputs,)
    if params is None:
        return module(*args, **kwargs)
    return functional_call(cast(nn.Module, module), params, args, kwargs)


def map_batch(batch, fn: Callable[[Tensor], Tensor]):
    """Apply ``fn`` to every tensor of a batch, keeping its layout (tuples, lists, dicts).

    Args:
        batch: any nesting of tuples, lists and dicts of tensors; other leaves are kept.
        fn: what to do with each tensor.

    Returns:
        The batch with every tensor ``t`` replaced by ``fn(t)``.

    Example:
        >>> map_batch({"x": torch.ones(2), "y": (torch.zeros(1),)}, lambda t: t + 1)
        {'x': tensor([2., 2.]), 'y': (tensor([1.]),)}
    """
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_batch(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(map_batch(v, fn) for v in batch)
    if isinstance(batch, list):
        return [map_batch(v, fn) for v in batch]
    return batch


def _is_tensors(x) -> bool:
    return isinstance(x, Tensor) or (
        isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)
    )


class Task:
    r"""How ``second`` runs a model on a batch: the adapter between your data and the library.

    The defaults handle ``(X, y)`` pairs (``model(X)``, or ``model(*X)`` for a tuple of
    inputs) and dicts of tensors (``model(**inputs)`` with every key but ``target_key``).
    For any other batch, subclass and override what differs; every method takes the batch
    as the data yields it.

    The loss of a batch is

    .. math:: L_b = \texttt{loss\_fn}(\mathrm{output}(b), \mathrm{targets}(b)),

    and with ``sample=True`` the targets are drawn from the model's predictive
    distribution (``y ~ p(y | f)``), which is how the Monte-Carlo Fisher is formed
    (supported for MSE, cross-entropy and BCE-with-logits losses).

    Args:
        loss_fn: ``loss_fn(output, targets)`` returning a scalar (default ``None``: the
            operator or :class:`~second.Influence` the task is given to supplies its own).
        target_key: where a dict batch keeps its targets (default ``"labels"``).

    Attributes:
        dataset_batch_size: examples per batch when the data is a map-style ``Dataset``
            (default 256).

    Example:
        >>> class DictTask(Task):                      # batches {"x": ..., "y": ...}
        ...     def output(self, model, batch):
        ...         return model(batch["x"])
        ...     def targets(self, batch):
        ...         return batch["y"]
        >>> model = torch.nn.Linear(3, 1)
        >>> batch = {"x": torch.randn(4, 3), "y": torch.randn(4, 1)}
        >>> task = DictTask(torch.nn.MSELoss())
        >>> task.batch_size(batch), task.loss(task.output(model, batch), batch).shape
        (4, torch.Size([]))
    """

    dataset_batch_size: int = 256

    def __init__(
        self,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        target_key: str = "labels",
    ):
        self.loss_fn = loss_fn
        self.target_key = target_key

    # -- what a batch is -----------------------------------------------------------------
    def is_batch(self, data) -> bool:
        """Whether ``data`` is one batch (rather than an iterable of batches)."""
        if isinstance(data, Mapping):
            return len(data) > 0 and all(isinstance(v, Tensor) for v in data.values())
        return (
            isinstance(data, (tuple, list))
            and len(data) == 2
            and _is_tensors(data[0])
            and isinstance(data[1], Tensor)
        )

    def check(self, batch) -> None:
        """Raise a clear error unless ``batch`` is a batch this task can run.

        Raises:
            TypeError: the batch has another layout (a dict without ``target_key``).
            ValueError: inputs and targets hold different numbers of examples.
        """
        if not self.is_batch(batch):
            raise TypeError(_layout_message(batch))
        if isinstance(batch, Mapping):
            if self.target_key not in batch:
                raise TypeError(
                    f"each batch must be an (X, y) pair of tensors or a dict of tensors with "
                    f"a {self.target_key!r} entry, got a dict with keys {sorted(batch)} (pass "
                    "task=second.Task(target_key=...))"
                )
            sizes = {int(v.shape[0]) if v.dim() else 0 for v in batch.values()}
        else:
            X, y = batch
            n_y = int(y.shape[0]) if y.dim() else 0
            for i, x in enumerate(tensor_leaves(X)):
                n_x = int(x.shape[0]) if x.dim() else 0
                if n_x != n_y:
                    which = "batch inputs" if isinstance(X, Tensor) else f"batch input {i}"
                    hint = (
                        " (an IterableDataset of single examples? wrap it in "
                        "torch.utils.data.DataLoader(data, batch_size=...))"
                        if not y.dim() or x.dim() == 1
                        else ""
                    )
                    raise ValueError(f"{which} have {n_x} examples but targets have {n_y}{hint}")
            sizes = {n_y}
        if len(sizes) > 1:
            raise ValueError(f"the tensors of a batch hold different numbers of examples {sizes}")

    def batch_size(self, batch) -> int:
        """The number of examples in ``batch`` (the leading size of its first tensor)."""
        leaves = tensor_leaves(batch)
        if not leaves:
            raise TypeError(f"a batch of type {type(batch).__name__} holds no tensor")
        return int(leaves[0].shape[0]) if leaves[0].dim() else 0

    def to(self, batch, device: torch.device | None):
        """``batch`` with every tensor on ``device`` (unchanged for ``None``)."""
        return batch if device is None else map_batch(batch, lambda t: t.to(device))

    def take(self, batch, index):
        """The examples ``index`` (an int or a slice) of ``batch``, every tensor indexed alike."""
        return map_batch(batch, lambda t: t[index])

    # -- running the model ---------------------------------------------------------------
    def output(self, model: Callable, batch) -> Tensor:
        """The model's output on ``batch``: ``model(X)``, ``model(*X)`` or ``model(**inputs)``.

        The model runs inside :func:`second.func.differentiable_attention`, so curvature
        products work through ``F.scaled_dot_product_attention``.
        """
        from ..func.attention import differentiable_attention

        with differentiable_attention():
            if isinstance(batch, Mapping):
                return call_model(model, {k: v for k, v in batch.items() if k != self.target_key})
            return call_model(model, batch[0])

    def targets(self, batch) -> Tensor:
        """What the loss compares the output with: ``y``, or ``batch[target_key]``."""
        return batch[self.target_key] if isinstance(batch, Mapping) else batch[1]

    def loss(
        self,
        output: Tensor,
        batch,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """The loss of ``batch`` given the model's ``output`` on it (a scalar).

        Args:
            output: :meth:`output` of the batch.
            batch: the batch.
            sample: draw the targets from the model's predictive distribution instead of
                using :meth:`targets` (the Monte-Carlo Fisher's targets).
            generator: the random generator for ``sample``.

        Raises:
            ValueError: the task has no ``loss_fn``.
        """
        if self.loss_fn is None:
            raise ValueError(
                "this Task has no loss_fn: pass Task(loss_fn) or give it to an operator"
            )
        y = sample_targets(self.loss_fn, output, generator) if sample else self.targets(batch)
        return self.loss_fn(output, y)

    def measurement(self, model: Callable, batch) -> Tensor:
        """What influence attributes on a test batch: by default its loss."""
        return self.loss(self.output(model, batch), batch)


def as_task(task: Task | None, loss_fn: Callable | None) -> Task:
    """The task an operator uses: ``task``, given ``loss_fn`` if it has none, or the default.

    Args:
        task: the user's :class:`Task` or ``None``.
        loss_fn: the loss the caller was given.

    Returns:
        A :class:`Task` with a ``loss_fn`` (a shallow copy when one had to be filled in,
        so the user's object is not changed).

    Raises:
        TypeError: ``task`` is not a :class:`Task`.

    Example:
        >>> as_task(None, torch.nn.MSELoss()).loss_fn
        MSELoss()
    """
    if task is None:
        return Task(loss_fn)
    if not isinstance(task, Task):
        raise TypeError(f"task must be a second.Task, got {type(task).__name__}")
    if task.loss_fn is None and loss_fn is not None:
        task = copy.copy(task)
        task.loss_fn = loss_fn
    return task


def _layout_message(batch) -> str:
    """Why ``batch`` is not a batch the default task reads (naming a non-tensor entry)."""
    if isinstance(batch, Mapping):
        bad = [k for k, v in batch.items() if not isinstance(v, Tensor)]
        if bad:
            k = bad[0]
            return (
                "each batch must be an (X, y) pair of tensors or a dict of tensors, got a "
                f"dict whose entry {k!r} is a {type(batch[k]).__name__}, not a tensor (drop "
                "it from the batches, e.g. in a collate_fn, or pass task=second.Task "
                "subclass that reads this layout)"
            )
    return (
        "each batch must be an (X, y) pair of tensors or a dict of tensors, got "
        f"{type(batch).__name__} (pass task=second.Task subclass for other batches)"
    )
