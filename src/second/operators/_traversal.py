"""Data traversal for the dataset-level operators: the one owner of how they read their data.

:class:`DataTraversal` is what :class:`~second.operators.curvature.CurvatureOperator` and the
Jacobian operators (:mod:`.jacobian`) share: their parameters (dtype and device from the
first; flat vectors split into parameter-shaped views and joined back), one-shot data
refused, the :class:`~second.Task`, the refusal of a stochastic model, every pass over the
data (a progress bar over batches, the same batches on every pass) and the per-batch graphs
kept on a single batch (or with ``cache_graphs=True``), rebuilt when a parameter changed in
place since they were built (autograd's version counters tell).

An operator fills in :meth:`DataTraversal._batch_state` (a batch's graphs) and the names its
messages use (``_kind``, ``_varies``); it may override :meth:`DataTraversal._states_of`
(what is kept per batch), :meth:`DataTraversal._allow_empty` (an empty shard of distributed
data) and :meth:`DataTraversal._inspect_batches` (a further check on the batches).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..data import (
    SamePassCheck,
    Task,
    batch_count,
    iterate_batches,
    refuse_one_shot,
    refuse_stochastic,
)
from ..func.products import as_params, trainable_parameters
from ..func.vectors import (
    columns_to_parameters,
    parameters_to_columns,
    parameters_to_vector,
    vector_to_parameters,
)

__all__ = ["DataTraversal"]


class DataTraversal:
    """Parameters, data passes and kept per-batch graphs of a dataset-level operator.

    A mixin: the operator calls :meth:`_take_params` and then :meth:`_init_traversal` from
    its constructor. Kept graphs (``_kept_states``) are rebuilt on the next product after a
    parameter was changed in place through autograd (``optimizer.step()``); a write through
    ``p.data`` is invisible to the version counters: :meth:`refresh` forgets them.
    """

    # what the messages call the operator ("A curvature operator must be the same matrix on
    # every product") and what a stochastic model would change ("a different matrix")
    _kind: str
    _varies: str

    params: tuple[Tensor, ...]
    device: torch.device
    model: nn.Module
    data: Any
    task: Task
    single_batch: bool
    check_deterministic: bool
    progressbar: bool
    cache_graphs: bool

    def _traversal_name(self) -> str:
        """The operator's name in messages and on the progress bar."""
        return type(self).__name__

    def _take_params(
        self, model: nn.Module, data, params: Sequence[Tensor] | None
    ) -> tuple[int, torch.dtype, torch.device]:
        """Refuse one-shot ``data`` and set ``params``; their total size, dtype and device.

        ``params`` defaults to every parameter of ``model`` with ``requires_grad``.
        """
        refuse_one_shot(data, self._traversal_name())
        self.params = trainable_parameters(model) if params is None else as_params(params)
        p0 = self.params[0]
        return sum(p.numel() for p in self.params), p0.dtype, p0.device

    def _init_traversal(
        self,
        model: nn.Module,
        data,
        task: Task,
        check_deterministic: bool,
        progressbar: bool,
        cache_graphs: bool,
    ) -> None:
        """Set the data and its options; refuse a stochastic model if ``check_deterministic``."""
        self.model = model
        self.data = data
        self.task = task
        self.single_batch = task.is_batch(data)
        self.check_deterministic = check_deterministic
        self.progressbar = progressbar
        self.cache_graphs = bool(cache_graphs)
        if check_deterministic:
            refuse_stochastic(
                model,
                f"every product would see a different {self._varies} (dropout, RReLU) or "
                "update the model's running statistics (batch norm); or pass "
                "check_deterministic=False if you mean it",
            )
        self._states: list | None = None  # kept per-batch graphs, built lazily
        self._versions: tuple[int, ...] = ()  # the parameters' versions when they were built
        self._pass_check = SamePassCheck(
            "the data",
            f"A {self._kind} operator must be the same matrix on every product: use "
            "shuffle=False or a fixed list of batches, or pass check_deterministic=False.",
        )

    # -- hooks ---------------------------------------------------------------------------
    def _allow_empty(self) -> bool:
        """Whether the data may hold no batch (an empty shard of distributed data)."""
        return False

    def _inspect_batches(self, batches: Iterator) -> Iterator:
        """A further check on the batches of a pass (default: none)."""
        return batches

    def _batch_state(self, batch):
        """One batch's graphs."""
        raise NotImplementedError

    def _states_of(self, batches: Iterable) -> Iterator:
        """What a product needs of each batch (default: its :meth:`_batch_state`)."""
        for b in batches:
            yield self._batch_state(b)

    # -- parameter-shaped views ----------------------------------------------------------
    def _split(self, V: Tensor, batched: bool) -> list[Tensor]:
        """``V`` (``[P]``, or ``[P, k]`` if ``batched``) as views shaped like ``params``."""
        if batched:
            return columns_to_parameters(V, self.params)
        return list(vector_to_parameters(V, self.params))

    def _join(self, ts: Sequence[Tensor], batched: bool) -> Tensor:
        """The inverse of :meth:`_split`: one flat ``[P]`` (or ``[P, k]``) tensor."""
        if batched:
            return parameters_to_columns(ts)
        return parameters_to_vector(ts)

    # -- passes --------------------------------------------------------------------------
    def _batches(self):
        """Batches, checking the data is the same on every pass."""
        it = iterate_batches(self.data, self.task, self.device, allow_empty=self._allow_empty())
        if self.progressbar and not self.single_batch:
            from .._progress import progress

            total = batch_count(self.data, self.task)
            name = self._traversal_name()
            it = progress(it, total=total, desc=name, unit="batch", enabled=True)
        if self.check_deterministic and not self.single_batch:
            it = self._pass_check(it)
        yield from self._inspect_batches(it)

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def _kept_states(self) -> list:
        """Every batch's state, kept (rebuilt after an in-place change of a parameter)."""
        if self._states is not None and self._versions != self._param_versions():
            self._states = None  # a parameter changed in place (an optimizer step): rebuild
        if self._states is None:
            self._versions = self._param_versions()
            self._states = list(self._states_of(self._batches()))
        return self._states

    def refresh(self) -> None:
        """Forget kept graphs.

        An in-place change of a parameter through autograd (``optimizer.step()``) is noticed
        by the next product, which rebuilds them; a write through ``p.data`` is not: call
        ``refresh()`` after one.
        """
        self._states = None
