r"""Dataset-level curvature operators: the engine, the Hessian and the generalized Gauss-Newton.

Each operator is built from ``(model, loss_fn, data, params=None)``. ``data`` is
one ``(X, y)`` batch or any iterable of batches (a ``DataLoader``). The product is
the curvature of the dataset objective

.. math:: L(\theta) = \sum_b \frac{W_b}{W} L_b(\theta) \quad(\text{mean reduction}),
          \qquad L(\theta) = \sum_b L_b(\theta) \quad(\text{sum reduction}),

the loss torch computes on all the data at once, so splitting a dataset into batches
does not change the operator. :math:`W_b` is what torch's mean divides the batch's loss
by and :math:`W = \sum_b W_b`: the number of examples :math:`n_b` for most losses; for
``CrossEntropyLoss`` and ``NLLLoss`` with class-index targets the sum of the class weights
of the targets that are not ``ignore_index`` (the number of valid targets without
``weight=``; the number of positions for class-probability targets). A batch whose every
target is ignored weighs 0 and is skipped. The weights come from the targets alone, in
the same pass as the product. A plain function as the loss (without a ``.reduction``) is
taken to be a mean over the batch unless ``reduction="sum"`` is passed.

Speed: on a single batch the operator builds the gradient graph once, and every
product is one further backward pass through it (for a matrix of columns, one
vmap-batched pass, or one pass per column where that is faster: see ``columns``).
Over an iterable each product re-traverses the data, unless ``cache_graphs=True``
keeps every batch's graphs.

Data parallel: when a ``torch.distributed`` process group is initialized, every
rank holds a shard of the data and products, gradients and batch counts are
all-reduced, so the result equals the single-process product on all the data.

:class:`CurvatureOperator` is the engine (data traversal, batching of columns, reduction,
``restrict``); a curvature fills in the per-batch product. The Fisher is in
:mod:`second.operators.fisher` and re-exported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as dist
from .._arguments import check_argument_order
from .._errors import outside_stacklevel
from .._losses import class_target_weights, linear_loss_note, reduction_of
from ..data import (
    SamePassCheck,
    Task,
    as_task,
    batch_count,
    iterate_batches,
    refuse_one_shot,
    refuse_stochastic,
)
from ..func.products import (
    GGNGraph,
    as_params,
    check_finite,
    check_scalar_loss,
    flatten_gradient,
    grad_checked,
    hvp_from_flat_gradient,
    trainable_parameters,
)
from ..func.vectors import (
    columns_to_parameters,
    parameters_to_columns,
    parameters_to_vector,
    vector_to_parameters,
)
from .base import LinearOperator

# Work (examples x parameters of a batch) above which "auto" loops over columns on CPU:
# measured crossover for tanh MLPs on one thread (benchmarks/bench_products.py).
_LOOP_COLUMNS_WORK = 8_000_000

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "FisherOperator",
    "iterate_batches",
]


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


class CurvatureOperator(LinearOperator):
    """Base class of the dataset-level curvature operators.

    Subclasses implement ``_batch_state(batch)`` (graphs for one batch) and
    ``_batch_product(state, vs, batched)`` (the batch-level product, reduced like
    the loss). The base class handles parameters, data traversal and weighting,
    determinism checks, distributed reduction and caching, and :meth:`restrict`.

    Args:
        model: the network.
        loss_fn: ``loss_fn(output, targets)`` returns a scalar.
        data: one batch, an iterable of batches, or a map-style ``Dataset``
            (:mod:`second.data`): ``(X, y)`` pairs and dicts of tensors work as they are,
            other batches through ``task``.
        params: tensors to take curvature with respect to (default: every
            parameter of ``model`` with ``requires_grad``).
        task: how to run the model on a batch (:class:`second.Task`; default: ``(X, y)``
            pairs and dicts of tensors with targets under ``"labels"``).
        reduction: ``"mean"`` or ``"sum"``; default ``loss_fn.reduction``, or ``"mean"`` for
            a loss without one (a plain function). Over several batches the operator weighs
            batch ``b`` by its share ``W_b / W`` of the dataset mean (module docstring), so a
            plain function that *sums* over the batch needs ``reduction="sum"``: otherwise
            the result depends on the batching (a warning says so when the first pass sees
            the loss of a batch equal the sum of its halves' losses). A ``reduction`` that
            contradicts ``loss_fn.reduction`` is refused.
        check_deterministic: verify that an iterable yields the same batches on every
            pass and that the model is not stochastic (dropout in training mode).
        distributed: all-reduce over the process group (default: when one is initialized).
        progressbar: show a tqdm bar over batches for each product.
        cache_graphs: over an iterable of batches, build every batch's graphs once and
            keep them, so each further product costs one backward pass per batch instead of
            a forward and two backward passes. Memory grows with the whole dataset's
            activations (and the data is read once, so a changing pipeline goes unnoticed
            after the first product); default ``False``. A single batch always keeps its graphs.
        columns: how ``op @ V`` treats the ``k`` columns of a matrix: ``"vmap"`` (one
            vmap-batched backward pass), ``"loop"`` (one backward pass per column through the
            same kept graphs) or ``"auto"`` (default): ``"loop"`` on CPU for a batch whose
            examples x parameters exceed ``8e6`` (a column then costs milliseconds, and vmap's
            batched backward, with its per-operator fallbacks, measured slower than the loop),
            ``"vmap"`` otherwise.

    Kept graphs (a single batch, or ``cache_graphs=True``) are rebuilt when a parameter
    was changed in place since they were built (``optimizer.step()``, ``p.add_(...)`` under
    ``torch.no_grad()``: autograd's version counters tell). A write through ``p.data`` is
    invisible to them: call :meth:`refresh` after one.

    Raises:
        ValueError: ``reduction`` is neither ``"mean"`` nor ``"sum"`` or contradicts
            ``loss_fn.reduction``; on a product, the mean loss has no weight at all (every
            target of the data is ``ignore_index``, or has class weight 0).
    """

    _init_call: tuple[tuple[Any, ...], dict[str, Any]]  # the constructor's arguments

    def __new__(cls, *args, **kwargs):
        """Record the constructor's arguments, which :meth:`restrict` calls it with again.

        A subclass with options of its own (a Fisher's ``fisher`` and ``mc_samples``,
        KFAC's ``damping``) keeps them all on a restriction.
        """
        self = super().__new__(cls)
        self._init_call = (args, dict(kwargs))
        return self

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data,
        params: Sequence[Tensor] | None = None,
        *,
        task: Task | None = None,
        reduction: str | None = None,
        check_deterministic: bool = True,
        distributed: bool | None = None,
        progressbar: bool = False,
        cache_graphs: bool = False,
        columns: str = "auto",
    ):
        check_argument_order(type(self).__name__, data, params)
        refuse_one_shot(data, type(self).__name__)
        self.params = trainable_parameters(model) if params is None else as_params(params)
        self._record_params(params)
        p0 = self.params[0]
        super().__init__(sum(p.numel() for p in self.params), p0.dtype, p0.device)
        self.model = model
        self.loss_fn = loss_fn
        self.task = as_task(task, loss_fn)
        self.data = data
        loss = self.task.loss_fn if self.task.loss_fn is not None else loss_fn
        own = getattr(loss, "reduction", None)
        if reduction is not None and isinstance(own, str) and own != reduction:
            raise ValueError(
                f"reduction={reduction!r} contradicts the loss' own reduction {own!r}: the "
                f"loss computes the {own} over each batch, so weighing the batches as a "
                f"{reduction} would make the operator depend on how the data is batched; "
                f"leave reduction=None or set {type(loss).__name__}(reduction={reduction!r})"
            )
        self.reduction = reduction_of(loss, reduction)
        self.check_deterministic = check_deterministic
        self.distributed = distributed
        self.progressbar = progressbar
        if columns not in ("auto", "vmap", "loop"):
            raise ValueError(f"columns must be 'auto', 'vmap' or 'loop', got {columns!r}")
        self.columns = columns
        self.cache_graphs = bool(cache_graphs)
        self.single_batch = self.task.is_batch(data)
        if check_deterministic:
            refuse_stochastic(
                model,
                "every product would see a different matrix (dropout, RReLU) or update the "
                "model's running statistics (batch norm); or pass check_deterministic=False "
                "if you mean it",
            )
        self._states: list | None = None  # kept per-batch graphs, built lazily
        self._versions: tuple[int, ...] = ()  # the parameters' versions when they were built
        # a plain function as a "mean" loss: check on the first pass that it does not sum
        self._check_summing = (
            reduction is None
            and not self.single_batch
            and check_deterministic
            and loss is not None
            and not hasattr(loss, "reduction")
        )
        self._pass_check = SamePassCheck(
            "the data",
            "A curvature operator must be the same matrix on every product: use shuffle=False "
            "or a fixed list of batches, or pass check_deterministic=False.",
        )
        self._num_data: int | None = None
        self._check_loss()

    def _record_params(self, params) -> None:
        """Keep the parameters as a tuple in the recorded call (a generator is read once)."""
        if params is None or not hasattr(self, "_init_call"):
            return
        args, kwargs = self._init_call
        if len(args) > 3 and args[3] is params:
            self._init_call = ((*args[:3], self.params, *args[4:]), kwargs)
        elif kwargs.get("params") is params:
            kwargs["params"] = self.params

    def _check_loss(self) -> None:
        """Refuse a loss this curvature is meaningless for (default: none)."""

    def restrict(self, batch) -> CurvatureOperator:
        r"""The same operator (same kind and options) on one batch of the data.

        The stochastic solvers (LiSSA, the stochastic Neumann series) multiply by the
        curvature of one mini-batch at a time: :math:`A_b` is this operator's matrix with
        ``data=batch``. Every constructor option is kept (a Fisher's ``fisher``,
        ``mc_samples`` and sampling state, ``columns``, ``cache_graphs``, the task and the
        reduction); the restriction is local to this process (``distributed=False``) and
        does not re-check the model (``check_deterministic=False``: the batch is one pass).

        Args:
            batch: one batch (as the data yields it).

        Returns:
            A new operator of the same class on ``batch``.

        Example:
            >>> model = torch.nn.Linear(2, 1).double()
            >>> X, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
            >>> H = HessianOperator(model, torch.nn.MSELoss(), [(X[:3], y[:3]), (X[3:], y[3:])])
            >>> H1 = H.restrict((X[:3], y[:3]))
            >>> torch.allclose(H1.to_dense(), HessianOperator(model, torch.nn.MSELoss(), (X[:3], y[:3])).to_dense())
            True
        """
        init_args, kwargs = self._init_call
        args = list(init_args)
        if len(args) > 2:
            args[2] = batch
        else:
            kwargs["data"] = batch
        kwargs.update(check_deterministic=False, distributed=False, progressbar=False)
        kwargs.update(self._restrict_options())
        return type(self)(*args, **kwargs)

    def _restrict_options(self) -> dict:
        """Constructor options that :meth:`restrict` sets anew.

        A subclass with a random generator gives the state it started from, not the
        caller's generator as it is now.
        """
        return {}

    # -- subclass hooks ------------------------------------------------------------------
    def _batch_state(self, batch):
        raise NotImplementedError

    def _batch_product(self, state, vs: list[Tensor], batched: bool) -> tuple[Tensor, ...]:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def _forward(self, batch, y=None) -> tuple[Tensor, Tensor]:
        """The output and loss on a batch (``_forward(X, y)`` still accepted for a pair)."""
        if y is not None:
            batch = (batch, y)
        out = self.task.output(self.model, batch)
        loss = self.task.loss(out, batch)
        check_scalar_loss(loss)
        return out, loss

    def _split(self, V: Tensor, batched: bool) -> list[Tensor]:
        if batched:
            return columns_to_parameters(V, self.params)
        return list(vector_to_parameters(V, self.params))

    def _join(self, ts: Sequence[Tensor], batched: bool) -> Tensor:
        if batched:
            return parameters_to_columns(ts)
        return parameters_to_vector(ts)

    def _batch_weight(self, batch, n_b: int) -> float:
        """:math:`W_b`, what the loss' mean divides the batch by (1 for a sum)."""
        if self.reduction == "sum":
            return 1.0
        loss_fn = self.task.loss_fn
        if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
            return float(n_b)
        return mean_weight(loss_fn, self.task.targets(batch), n_b)

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

    def _batches(self):
        """Batches, checking the data is the same on every pass."""
        it = iterate_batches(
            self.data, self.task, self.device, allow_empty=dist.active(self.distributed)
        )
        if self.progressbar and not self.single_batch:
            from .._progress import progress

            total = batch_count(self.data, self.task)
            it = progress(it, total=total, desc=type(self).__name__, unit="batch", enabled=True)
        if self.check_deterministic and not self.single_batch:
            it = self._pass_check(it)
        if self._check_summing:
            it = self._summing_check(it)
        yield from it

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

    def _mode(self, batched: bool, n_b: int) -> str:
        """``"vec"`` for a vector; ``"loop"`` or ``"vmap"`` over the columns of a matrix."""
        if not batched:
            return "vec"
        if self.columns != "auto":
            return self.columns
        big = n_b * self.shape[0] >= _LOOP_COLUMNS_WORK
        return "loop" if self.device.type == "cpu" and big else "vmap"

    def _prepare(self, V: Tensor, mode: str):
        """Split ``V`` into parameter-shaped views (per column for ``"loop"``)."""
        if mode == "loop":
            return [self._split(V[:, j], False) for j in range(V.shape[1])]
        return self._split(V, mode == "vmap")

    def _product(self, state, vs, mode: str) -> Tensor:
        """Multiply one batch's kept graphs with the prepared ``vs``; return a flat product."""
        if mode == "loop":
            cols = [self._join(self._batch_product(state, c, False), False) for c in vs]
            return torch.stack(cols, dim=1)
        return self._join(self._batch_product(state, vs, mode == "vmap"), mode == "vmap")

    def _states_of(self, batches):
        """``(state, n_b, W_b)`` per batch; no state (``None``) for a skipped batch."""
        for b in batches:
            n_b = self.task.batch_size(b)
            w_b = self._batch_weight(b, n_b)
            yield (None if self._skipped(w_b) else self._batch_state(b)), n_b, w_b

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def _kept_states(self) -> list:
        if self._states is not None and self._versions != self._param_versions():
            self._states = None  # a parameter changed in place (an optimizer step): rebuild
        if self._states is None:
            self._versions = self._param_versions()
            if self.single_batch:
                batches = iterate_batches(
                    self.data, self.task, self.device, allow_empty=dist.active(self.distributed)
                )
            else:
                batches = self._batches()
            self._states = list(self._states_of(batches))
        return self._states

    def _apply(self, V: Tensor, batched: bool) -> Tensor:
        prepared: dict[str, object] = {}  # V split once per product and mode

        def product(state, n_b: int) -> Tensor:
            mode = self._mode(batched, n_b)
            if mode not in prepared:
                prepared[mode] = self._prepare(V, mode)
            return self._product(state, prepared[mode], mode)

        # weighted sums of half-precision products in float32: in float16 a sum over many
        # examples overflows (65504), in bfloat16 it loses its low digits
        wide = torch.float32 if V.dtype in (torch.float16, torch.bfloat16) else V.dtype
        kept = self._kept_states() if self.single_batch else None
        if kept == []:  # an empty shard of distributed data: it adds nothing
            acc, count, total = V.new_zeros(V.shape, dtype=wide), 0.0, 0.0
        elif kept is not None:
            ((state, n_b, w_b),) = kept
            skip = self._skipped(w_b)
            if not dist.active(self.distributed):
                if skip:
                    self._check_total(0.0)
                return product(state, n_b)
            acc = V.new_zeros(V.shape, dtype=wide) if skip else product(state, n_b).to(wide)
            acc, count, total = acc * self._scale(n_b, w_b), float(n_b), w_b
        else:
            states = self._kept_states() if self.cache_graphs else self._states_of(self._batches())
            acc, count, total = V.new_zeros(V.shape, dtype=wide), 0.0, 0.0
            for state, n_b, w_b in states:
                if not self._skipped(w_b):
                    acc.add_(product(state, n_b).to(wide), alpha=self._scale(n_b, w_b))
                count += n_b
                total += w_b
                del state
        acc, count, total = self._reduce(acc, count, total)
        self._check_nonempty(count)
        self._num_data = int(count)
        self._check_total(total)
        if self.reduction == "mean":
            acc.div_(self._divisor(count, total))
        return acc.to(V.dtype)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._apply(v, batched=False)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V, batched=True)

    # -- dataset quantities --------------------------------------------------------------
    @property
    def num_data(self) -> int:
        """Number of examples ``N`` in the data (summed over ranks)."""
        if self._num_data is None:
            batches = iterate_batches(
                self.data, self.task, allow_empty=dist.active(self.distributed)
            )
            count = float(sum(self.task.batch_size(b) for b in batches))
            zero = torch.zeros(1, dtype=self.dtype, device=self.device)
            _, count, _ = self._reduce(zero, count, 0.0)
            self._check_nonempty(count)
            self._num_data = int(count)
        return self._num_data

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The dataset loss and its flat gradient (detached), reduced like the operator.

        The loss is torch's loss on all the data at once (each batch weighed by its share
        :math:`W_b / W` of the mean, see the module docstring), also over several batches.
        """
        # a sum over many examples overflows half precision: accumulate in float32 (as _apply)
        wide = torch.float32 if self.dtype in (torch.float16, torch.bfloat16) else self.dtype
        acc = torch.zeros(self.shape[0] + 1, dtype=wide, device=self.device)
        count = total = 0.0
        for batch in self._batches():
            n_b = self.task.batch_size(batch)
            w = self._batch_weight(batch, n_b)
            count += n_b
            total += w
            if self._skipped(w):
                continue
            _, loss = self._forward(batch)
            g = grad_checked(loss, self.params)
            acc[:-1].add_(parameters_to_vector(g), alpha=w)
            acc[-1] += w * loss.detach().to(acc.dtype)
        acc, count, total = self._reduce(acc, count, total)
        self._check_nonempty(count)
        self._num_data = int(count)
        self._check_total(total)
        if self.reduction == "mean":
            acc.div_(total)
        check_finite(acc, "gradient")
        acc = acc.to(self.dtype)
        return acc[-1], acc[:-1]

    def gradient(self) -> Tensor:
        """The flat dataset gradient (detached)."""
        return self.loss_and_gradient()[1]

    def refresh(self) -> None:
        """Forget kept graphs.

        An in-place change of a parameter through autograd (``optimizer.step()``) is noticed
        by the next product, which rebuilds them; a write through ``p.data`` is not: call
        ``refresh()`` after one.
        """
        self._states = None


class HessianOperator(CurvatureOperator):
    r"""The Hessian :math:`\nabla^2_\theta L` of the dataset loss, matrix-free.

    Symmetric, generally indefinite away from a minimum. See :class:`CurvatureOperator`
    for the arguments.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> X, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> H = HessianOperator(model, torch.nn.MSELoss(), (X, y))
        >>> H.shape
        (4, 4)
        >>> (H @ torch.ones(4)).shape
        torch.Size([4])
    """

    # The state is the flat gradient with its graph, so a product multiplies the flat
    # vector (or the transposed matrix) directly, with no per-parameter split.
    def _batch_state(self, batch):
        _, loss = self._forward(batch)
        return flatten_gradient(grad_checked(loss, self.params, create_graph=True))

    def _prepare(self, V: Tensor, mode: str):
        if mode == "loop":
            return [V[:, j] for j in range(V.shape[1])]
        return V.T if mode == "vmap" else V

    def _batch_product(self, state, vs, batched):
        return hvp_from_flat_gradient(state, self.params, vs, batched=batched)


class GGNOperator(CurvatureOperator):
    r"""The generalized Gauss-Newton matrix :math:`\sum_b w_b J_b^\top (\nabla^2_f L_b) J_b`.

    Positive semi-definite for losses convex in the network output; equals the
    Fisher information for cross-entropy and for MSE (up to the loss' scale).
    Each product costs two backward passes through kept graphs on a single batch.

    Example:
        >>> model = torch.nn.Linear(2, 1).double()          # linear model + MSE: G = H
        >>> X, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
        >>> G = GGNOperator(model, torch.nn.MSELoss(), (X, y))
        >>> H = HessianOperator(model, torch.nn.MSELoss(), (X, y))
        >>> torch.allclose(G.to_dense(), H.to_dense())
        True
    """

    psd = True

    def _check_loss(self) -> None:
        note = linear_loss_note(self.loss_fn)
        if note is not None:
            raise ValueError(f"{type(self).__name__}: {note}")

    def _batch_state(self, batch):
        out, loss = self._forward(batch)
        return GGNGraph(loss, out, self.params)

    def _batch_product(self, state, vs, batched):
        return state.gvp(vs, batched)


# the Fisher (built on CurvatureOperator, defined above)
from .fisher import FisherOperator  # noqa: E402
