r"""How the curvature operators weigh batches: each batch's share of the dataset loss.

For a mean loss batch ``b`` counts with :math:`W_b / W`, :math:`W_b` being what torch's mean
divides its loss by (:func:`mean_weight`) and :math:`W = \sum_b W_b`; for a sum with 1
(:mod:`second.operators.curvature` has the whole rule). :class:`BatchWeighting` is the part
of :class:`~second.operators.curvature.CurvatureOperator` that works this out: the reduction,
each batch's weight and scale, the divisor, the all-reduce of the sums and counts over ranks
and their checks, and the warning for a plain-function loss that sums.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as dist
from .._errors import outside_stacklevel
from .._losses import class_target_weights, reduction_of
from ._traversal import DataTraversal

__all__ = ["mean_weight", "BatchWeighting"]


def mean_weight(loss_fn: Callable | None, target: Any, n: int) -> float:
    r"""What torch's ``reduction="mean"`` divides a batch's loss by (:math:`W_b`).

    The number of examples ``n``, except for ``CrossEntropyLoss``/``NLLLoss`` with class
    indices: the sum of the class weights of the valid targets (``ignore_index`` excluded;
    the number of valid targets without ``weight=``), and with class probabilities the
    number of positions. The units agree across batches, so :math:`W_b / \sum_b W_b` is
    the batch's share of the loss on all the data at once. Without class weights and with
    no ignored target it is ``n`` times the positions per example (``n`` for classification).
    """
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or not isinstance(target, Tensor):
        return float(n)
    if target.is_floating_point():  # class probabilities [n, C, *positions]
        return float(target.numel() // target.shape[1]) if target.dim() > 1 else float(n)
    # summed in float64 (float32 where there is none): half precision counts only to 256
    dtype = torch.float32 if target.device.type == "mps" else torch.float64
    weights = class_target_weights(loss_fn, target, target.new_empty(0, dtype=dtype))
    if weights is None:  # every target valid, no class weights
        return float(target.numel())
    return float(weights[1].sum())


class BatchWeighting(DataTraversal):
    """A data traversal whose batches weigh in a dataset loss by their share of it.

    Sets nothing itself: the operator sets ``reduction`` (through
    :meth:`_resolve_reduction`), ``distributed`` and ``_check_summing`` (whether the first
    pass looks for a plain-function loss that sums over the batch).
    """

    reduction: str
    distributed: bool | None
    _check_summing: bool

    @staticmethod
    def _resolve_reduction(loss, reduction: str | None) -> str:
        """``reduction``, else the loss' own; one that contradicts the loss' is refused."""
        own = getattr(loss, "reduction", None)
        if reduction is not None and isinstance(own, str) and own != reduction:
            raise ValueError(
                f"reduction={reduction!r} contradicts the loss' own reduction {own!r}: the "
                f"loss computes the {own} over each batch, so weighing the batches as a "
                f"{reduction} would make the operator depend on how the data is batched; "
                f"leave reduction=None or set {type(loss).__name__}(reduction={reduction!r})"
            )
        return reduction_of(loss, reduction)

    # -- the batches' weights ------------------------------------------------------------
    def _batch_weight(self, batch, n_b: int) -> float:
        """:math:`W_b`, what the loss' mean divides the batch by (1 for a sum)."""
        if self.reduction == "sum":
            return 1.0
        loss_fn = self.task.loss_fn
        if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            return float(n_b)
        return mean_weight(loss_fn, self.task.targets(batch), n_b)

    def _states_of(self, batches: Iterable) -> Iterator:
        """``(state, n_b, W_b)`` per batch; no state (``None``) for a skipped batch."""
        for b in batches:
            n_b = self.task.batch_size(b)
            w_b = self._batch_weight(b, n_b)
            yield (None if self._skipped(w_b) else self._batch_state(b)), n_b, w_b

    def batch_shares(self, batches: Sequence) -> Tensor:
        r"""Each batch's share :math:`c_b` of the operator: :math:`A = \sum_b c_b A_b`.

        :math:`A_b` is :meth:`restrict` to batch ``b``: for a mean loss :math:`c_b =
        W_b / W` (torch's divisor of the batch over the total; 0 for a batch whose targets
        are all ignored), for a sum 1 (``float64``, on the CPU). What a stochastic solver
        samples batches by.

        Raises:
            ValueError: a mean loss whose data has no valid target.
        """
        sizes = [self.task.batch_size(b) for b in batches]
        weights = [self._batch_weight(b, n_b) for b, n_b in zip(batches, sizes)]
        if self.reduction == "mean":
            self._check_total(float(sum(weights)))
            div = self._divisor(float(sum(sizes)), float(sum(weights)))
        else:
            div = 1.0
        return torch.tensor(
            [
                0.0 if self._skipped(w_b) else self._scale(n_b, w_b) / div
                for n_b, w_b in zip(sizes, weights)
            ],
            dtype=torch.float64,
        )

    def _skipped(self, w_b: float) -> bool:
        """A batch without weight in the dataset mean (every target ignored): no product."""
        return self.reduction == "mean" and w_b == 0.0

    def _scale(self, n_b: float, w_b: float) -> float:
        """The factor a batch's product is summed with: :math:`W_b` (mean) or 1 (sum)."""
        return w_b

    def _divisor(self, count: float, total: float) -> float:
        """What the sum of the scaled products is divided by: :math:`W` (mean) or 1 (sum)."""
        return total if self.reduction == "mean" else 1.0

    # -- sums and counts over the data (and the ranks) -----------------------------------
    def _allow_empty(self) -> bool:
        """Under ``torch.distributed`` a rank's shard of the data may be empty."""
        return dist.active(self.distributed)

    def _reduce(self, acc: Tensor, count: float, total: float) -> tuple[Tensor, float, float]:
        """All-reduce the accumulated products, the example count and the total weight.

        The counts go in a float64 tensor of their own: in a half-precision model's dtype
        they would be rounded (bfloat16 is exact only up to 256) or overflow (float16 at
        65504).
        """
        if dist.active(self.distributed):
            counts = torch.tensor([count, total], dtype=torch.float64, device=acc.device)
            acc = acc.contiguous()  # the same memory layout on every rank
            dist.all_reduce_sum(acc)
            dist.all_reduce_sum(counts)
            return acc, float(counts[0]), float(counts[1])
        return acc, count, total

    def _check_nonempty(self, count: float) -> None:
        """Raise when the data (over every rank) holds no example.

        Under ``torch.distributed`` a rank's shard may be empty (it adds nothing); the
        reduced count is the same on every rank, so all of them raise together.
        """
        if count == 0.0:
            where = " on every rank" if dist.active(self.distributed) else ""
            raise ValueError(f"the data is empty{where}: it yielded no (non-empty) batch")

    def _check_total(self, total: float) -> None:
        if self.reduction == "mean" and total == 0.0:
            raise ValueError(
                f"{type(self).__name__}: the mean loss has no weight: every target of the "
                "data is the loss' ignore_index (or has class weight 0), so torch's mean loss "
                "is 0/0 (NaN) and has no curvature"
            )

    # -- a plain function that sums ------------------------------------------------------
    def _inspect_batches(self, batches: Iterator) -> Iterator:
        if self._check_summing:
            return self._summing_check(batches)
        return batches

    def _summing_check(self, batches: Iterator) -> Iterator:
        """Yield ``batches``; on the second one, warn if a plain-function loss sums."""
        for i, batch in enumerate(batches):
            if i == 1 and self._check_summing:
                self._check_summing = False
                self._warn_if_summing(batch)
            yield batch

    def _warn_if_summing(self, batch) -> None:
        """Warn when the loss of ``batch`` is the sum of its halves' losses, not their mean.

        Advisory: a loss that cannot be evaluated on half a batch is left alone.
        """
        n = self.task.batch_size(batch)
        if n < 2:
            return
        k = n // 2
        try:
            with torch.no_grad():
                out = self.task.output(self.model, batch)
                if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n:
                    return
                whole = float(self.task.loss(out, batch))
                a = float(self.task.loss(out[:k], self.task.take(batch, slice(0, k))))
                b = float(self.task.loss(out[k:], self.task.take(batch, slice(k, n))))
        except Exception:  # noqa: BLE001  (only a hint: never fail the product for it)
            return
        summed, averaged = a + b, (k * a + (n - k) * b) / n
        tol = 1e-4 * max(abs(whole), abs(summed), abs(averaged))
        if abs(whole - summed) <= tol < abs(whole - averaged):
            warnings.warn(
                f"{type(self).__name__}: loss_fn has no .reduction, so the operator takes it "
                "to be a mean over the batch and weighs each batch by its share of the "
                "examples, but its value on a batch is the sum of its values on the two "
                "halves: it looks like a sum, and the operator would then depend on how the "
                'data is batched; pass reduction="sum" (or make the loss a mean)',
                UserWarning,
                stacklevel=outside_stacklevel(),
            )
