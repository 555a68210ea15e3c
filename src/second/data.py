r"""Batches and data passes: the one owner of how ``second`` reads your data.

A **batch** is whatever the data yields: an ``(X, y)`` pair of tensors (``X`` may be a
tuple of tensors for a model with several inputs), a dict of tensors (the HuggingFace
style, targets under ``"labels"``), or anything else a :class:`Task` knows how to run.
**Data** is one batch, an iterable of batches (a ``DataLoader``, a list), or a map-style
``torch.utils.data.Dataset`` (read in order, :attr:`Task.dataset_batch_size` examples at a
time).

The curvature operators and :class:`~second.Influence` read data through
:func:`iterate_batches` (with checks) and :class:`SamePassCheck` (the same batches on every
pass), and run the model through a :class:`Task`. With the default task,

.. math:: L_b(\theta) = \texttt{loss\_fn}(f_\theta(X_b), y_b)

for a pair, and ``loss_fn(model(**inputs), batch["labels"])`` for a dict, so simple users
never write one.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ._errors import NonDeterministicDataError
from ._losses import sample_targets

__all__ = [
    "Task",
    "tensor_leaves",
    "call_model",
    "as_task",
    "map_batch",
    "iterate_batches",
    "batch_fingerprint",
    "SamePassCheck",
    "stochastic_modules",
    "refuse_stochastic",
    "sample_generator",
]


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
        from .func.attention import differentiable_attention

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


def batch_fingerprint(batch, ordered: bool = False) -> tuple:
    """A content fingerprint of a batch: its tensors' shapes and dtypes, and weighted sums.

    Per example (a row along the first dimension that the batch's tensors of that length
    share) and tensor, the plain sum and a sum weighted by a pseudo-random weight in
    ``[1, 2)`` per position within the example, in float64, compared exactly: a flip, a
    transposition or any other permutation of the values within an example changes it, so
    does a change of one element at any scale (values of 1e-8 as well as 1e8: nothing is
    rounded), and the same data holding NaN or Inf gets the same fingerprint on every pass
    (they enter as fixed stand-ins). Computed where the tensors are (one pass over each, a
    few numbers per example moved to the host): about 1 ms for a 256x3x32x32 float32 batch
    on one CPU core.

    Without ``ordered`` the examples' rows are sorted: a batch whose examples were permuted
    as a whole gets the same fingerprint (a curvature operator does not depend on the
    order), but one whose inputs and targets were paired differently does not. With
    ``ordered`` the rows stay in order, so a permutation of the examples is told apart too.

    Args:
        batch: a batch (any nesting of tuples, lists and dicts of tensors).
        ordered: also tell permutations of the examples apart.

    Returns:
        A tuple of the tensors' ``(shape, dtype)`` pairs and the sums (hashable, comparable).

    Example:
        >>> X = torch.tensor([[1.0], [2.0]])
        >>> batch_fingerprint((X, X)) == batch_fingerprint((X.flip(0), X.flip(0)))
        True
        >>> batch_fingerprint((X, X)) == batch_fingerprint((X, X.flip(0)))
        False
        >>> batch_fingerprint((X, X), ordered=True) == batch_fingerprint((X.flip(0), X.flip(0)), ordered=True)
        False
    """
    ts = [t.detach() for t in tensor_leaves(batch)]
    head = tuple((tuple(t.shape), str(t.dtype)) for t in ts)
    n = ts[0].shape[0] if ts and ts[0].dim() > 0 else 0
    rows = [t for t in ts if n > 0 and t.dim() > 0 and t.shape[0] == n]
    other = [t for t in ts if not any(t is r for r in rows)]
    sums = tuple(tuple(_weighted_sums(t.reshape(1, -1)).reshape(-1).tolist()) for t in other)
    if not rows:
        return (head, sums)
    per = torch.cat([_weighted_sums(t.reshape(n, -1)).to(rows[0].device) for t in rows], 1)
    if not ordered:  # rows sorted by a key of all their sums (ties: equal rows, in any order)
        key = per @ torch.linspace(1.0, 2.0, per.shape[1], dtype=torch.float64, device=per.device)
        per = per[torch.argsort(key, stable=True)]
    return (head, sums, tuple(per.reshape(-1).tolist()))


#: NaN and +-Inf enter a fingerprint as these (finite, so the weighted sums stay comparable)
_FINGERPRINT_STAND_INS = (1.2345e100, 5.4321e100)


def _weighted_sums(x: Tensor) -> Tensor:
    """``[rows, 2]``: each row's float64 sum and its sum weighted by position (see above)."""
    xf = x.to(torch.float64)
    if xf.is_complex():
        xf = torch.view_as_real(xf).reshape(xf.shape[0], -1)
    m = xf.shape[1]
    j = torch.arange(m, dtype=torch.int64, device=xf.device)
    w = 1.0 + ((j * 2654435761) % 1000003).to(torch.float64) / 1000003.0
    W = torch.stack([torch.ones_like(w), w], 1)
    sums = xf @ W  # one pass: the plain and the weighted sum
    if not bool(torch.isfinite(sums).all()):  # NaN or Inf in the data: their stand-ins
        nan, inf = _FINGERPRINT_STAND_INS
        sums = torch.nan_to_num(xf, nan=nan, posinf=inf, neginf=-inf) @ W
    return sums


class SamePassCheck:
    """Checks that an iterable of batches yields the same batches on every pass.

    The first complete pass records each batch's :func:`batch_fingerprint`; every later
    pass is compared batch by batch and raises :class:`~second.NonDeterministicDataError`
    at the first difference (a shuffling ``DataLoader``, random augmentation) or when
    the number of batches changes. Calling the object wraps an iterator of batches.

    A list of batches yields the same tensor objects on every pass: the same objects with
    the same autograd version counters hold the same values, and hashing them again is
    skipped. A ``DataLoader`` collates new tensors, which are fingerprinted afresh.

    Args:
        what: how the data is named in the error message.
        hint: what the user can do, appended to the message.
        ordered: also detect a permutation of the examples within a batch (needed where
            results are indexed by example, as influence scores are).

    Example:
        >>> check = SamePassCheck()
        >>> data = [(torch.ones(2, 1), torch.zeros(2))]
        >>> len(list(check(iter(data)))), len(list(check(iter(data))))
        (1, 1)
    """

    def __init__(self, what: str = "the data", hint: str = "", ordered: bool = False):
        self.what, self.hint, self.ordered = what, hint, ordered
        self.fingerprints: list[tuple] | None = None
        self._tensors: dict[int, tuple] = {}  # batch i: (weakrefs, versions) last seen

    def __call__(self, batches: Iterable) -> Iterator:
        """Yield ``batches``, checking each against the first pass."""
        seen = []
        for i, batch in enumerate(batches):
            fp = self._fingerprint(i, batch)
            if self.fingerprints is not None:
                if i >= len(self.fingerprints) or fp != self.fingerprints[i]:
                    raise NonDeterministicDataError(
                        f"batch {i} of {self.what} differs from the one seen on the first pass "
                        f"(a shuffling DataLoader or random augmentation?). {self.hint}".rstrip()
                    )
            seen.append(fp)
            yield batch
        if self.fingerprints is None:
            self.fingerprints = seen
        elif len(seen) != len(self.fingerprints):
            raise NonDeterministicDataError(
                f"{self.what} yielded {len(seen)} batches, {len(self.fingerprints)} on the first "
                f"pass. {self.hint}".rstrip()
            )

    def _fingerprint(self, i: int, batch) -> tuple:
        ts = tensor_leaves(batch)
        known = self._tensors.get(i)
        if known is not None and self.fingerprints is not None and i < len(self.fingerprints):
            refs, versions = known
            if len(refs) == len(ts) and all(
                r() is t and t._version == v for r, t, v in zip(refs, ts, versions, strict=True)
            ):
                return self.fingerprints[i]
        fp = batch_fingerprint(batch, self.ordered)
        self._tensors[i] = (tuple(weakref.ref(t) for t in ts), tuple(t._version for t in ts))
        return fp


def stochastic_modules(model: nn.Module) -> list[str]:
    """Modules that make repeated forward passes differ, as ``"name (Type)"`` labels.

    Dropout and RReLU draw new noise; batch norm in training mode updates its running
    statistics, so each product would change the model's buffers.

    Example:
        >>> stochastic_modules(torch.nn.Sequential(torch.nn.Dropout(0.5)))
        ['0 (Dropout)']
    """
    found = []
    for name, m in model.named_modules():
        if not m.training:
            continue
        label = f"{name or type(m).__name__} ({type(m).__name__})"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(label)
        elif isinstance(m, nn.RReLU):
            found.append(label)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            found.append(label)
    return found


def refuse_stochastic(model: nn.Module, consequence: str) -> None:
    """Raise :class:`~second.NonDeterministicDataError` if ``model`` has stochastic modules.

    Args:
        model: the network.
        consequence: what would go wrong, for the message ("every product would see a
            different matrix").

    Raises:
        NonDeterministicDataError: naming up to three of the :func:`stochastic_modules`.

    Example:
        >>> refuse_stochastic(torch.nn.Linear(2, 1), "products would differ")  # fine
    """
    stochastic = stochastic_modules(model)
    if stochastic:
        raise NonDeterministicDataError(
            f"the model is in training mode with {', '.join(stochastic[:3])}: {consequence}. "
            "Call model.eval() first."
        )


def sample_generator(
    generator: torch.Generator | None, device: torch.device, per_rank: bool = False
) -> torch.Generator:
    """A private generator for an operator's random samples, never the caller's own.

    A copy of ``generator``'s current state (seed 0 when ``None``): an operator resets it
    before every pass over the data, so its samples, and the matrix, are the same on every
    product, and the caller's generator is neither advanced nor reset.

    With ``per_rank`` under an initialized process group, rank ``r > 0`` gets other samples
    than rank 0 (as Sophia's and AdaHessian's "seed plus the rank"): seed ``r`` when
    ``generator`` is ``None``, else a seed drawn from the copy plus ``r``. Rank 0 keeps the
    samples of one process. Monte-Carlo samples alike on every rank would be correlated
    across the shards, so averaging over ranks would not reduce their variance.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> private = sample_generator(g, torch.device("cpu"))
        >>> private is g, torch.equal(private.get_state(), g.get_state())
        (False, True)
    """
    from . import distributed as dist

    private = torch.Generator(device=device)
    if generator is None:
        private.manual_seed(0)
    else:
        private.set_state(generator.get_state())
    r = dist.rank() if per_rank and dist.active() else 0
    if r > 0:
        base = 0 if generator is None else int(torch.randint(0, 2**62, (1,), generator=private))
        private.manual_seed(base + r)
    return private
