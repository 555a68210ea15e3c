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

:class:`CurvatureOperator` is the engine (data traversal from :mod:`._traversal`, the
batches' weights and the reduction from :mod:`._weighting`, batching of columns,
``restrict``); a curvature fills in the per-batch product. The Fisher is in
:mod:`second.operators.fisher` and re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as dist
from .._arguments import check_argument_order
from .._losses import linear_loss_note
from ..data import Task, as_task, iterate_batches
from ..func.products import (
    GGNGraph,
    check_finite,
    check_scalar_loss,
    flatten_gradient,
    grad_checked,
    hvp_from_flat_gradient,
)
from ..func.vectors import parameters_to_vector
from ._weighting import BatchWeighting
from ._weighting import mean_weight as mean_weight  # importable from here, as before
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


class CurvatureOperator(BatchWeighting, LinearOperator):
    """Base class of the dataset-level curvature operators.

    Subclasses implement ``_batch_state(batch)`` (graphs for one batch) and
    ``_batch_product(state, vs, batched)`` (the batch-level product, reduced like
    the loss). The base class handles parameters, data traversal and weighting,
    determinism checks, distributed reduction and caching (the traversal from
    :mod:`._traversal`, the weighting from :mod:`._weighting`), and :meth:`restrict`.

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
    _kind, _varies = "curvature", "matrix"  # as the data traversal's messages name them

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
        size, dtype, device = self._take_params(model, data, params)
        self._record_params(params)
        super().__init__(size, dtype, device)
        self.loss_fn = loss_fn
        task = as_task(task, loss_fn)
        loss = task.loss_fn if task.loss_fn is not None else loss_fn
        self.reduction = self._resolve_reduction(loss, reduction)
        self.distributed = distributed
        if columns not in ("auto", "vmap", "loop"):
            raise ValueError(f"columns must be 'auto', 'vmap' or 'loop', got {columns!r}")
        self.columns = columns
        self._init_traversal(model, data, task, check_deterministic, progressbar, cache_graphs)
        # a plain function as a "mean" loss: check on the first pass that it does not sum
        self._check_summing = (
            reduction is None
            and not self.single_batch
            and check_deterministic
            and loss is not None
            and not hasattr(loss, "reduction")
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

    # -- subclass hooks (and _batch_state, the traversal's) ---------------------------------
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
            batches = iterate_batches(self.data, self.task, allow_empty=self._allow_empty())
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
