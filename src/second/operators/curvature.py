r"""Dataset-level curvature operators: the engine, the Hessian and the generalized Gauss-Newton.

Each operator is built from ``(model, loss_fn, data, params=None)``. ``data`` is
one ``(X, y)`` batch or any iterable of batches (a ``DataLoader``). The product is
the curvature of the dataset objective

.. math:: L(\theta) = \sum_b \frac{n_b}{N} L_b(\theta) \quad(\text{mean reduction}),
          \qquad L(\theta) = \sum_b L_b(\theta) \quad(\text{sum reduction}),

so splitting a dataset into batches does not change the operator.

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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as dist
from .._arguments import check_argument_order
from .._losses import linear_loss_note, reduction_of
from ..data import (
    SamePassCheck,
    Task,
    as_task,
    iterate_batches,
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
        reduction: ``"mean"`` or ``"sum"``; default ``loss_fn.reduction`` or ``"mean"``.
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
        self.params = trainable_parameters(model) if params is None else as_params(params)
        p0 = self.params[0]
        super().__init__(sum(p.numel() for p in self.params), p0.dtype, p0.device)
        self.model = model
        self.loss_fn = loss_fn
        self.task = as_task(task, loss_fn)
        self.data = data
        self.reduction = reduction_of(loss_fn, reduction)
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
        self._pass_check = SamePassCheck(
            "the data",
            "A curvature operator must be the same matrix on every product: use shuffle=False "
            "or a fixed list of batches, or pass check_deterministic=False.",
        )
        self._num_data: int | None = None
        self._check_loss()

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

    def _weight(self, n_b: int) -> float:
        return float(n_b) if self.reduction == "mean" else 1.0

    def _batches(self):
        """Batches, checking the data is the same on every pass."""
        it = iterate_batches(self.data, self.task, self.device)
        if self.progressbar and not self.single_batch:
            from .._progress import progress

            total = len(self.data) if hasattr(self.data, "__len__") else None
            it = progress(it, total=total, desc=type(self).__name__, unit="batch", enabled=True)
        if self.check_deterministic and not self.single_batch:
            it = self._pass_check(it)
        yield from it

    def _reduce(self, acc: Tensor, count: float) -> tuple[Tensor, float]:
        if dist.active(self.distributed):
            buf = torch.cat([acc.reshape(-1), acc.new_tensor([count])])
            dist.all_reduce_sum(buf)
            return buf[:-1].reshape(acc.shape), float(buf[-1])
        return acc, count

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
        return ((self._batch_state(b), self.task.batch_size(b)) for b in batches)

    def _kept_states(self) -> list:
        if self._states is None:
            if self.single_batch:
                batches = iterate_batches(self.data, self.task, self.device)
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

        if self.single_batch:
            ((state, n_b),) = self._kept_states()
            out = product(state, n_b)
            if not dist.active(self.distributed):
                return out
            acc, count = out * self._weight(n_b), float(n_b)
        else:
            states = self._kept_states() if self.cache_graphs else self._states_of(self._batches())
            acc, count = torch.zeros_like(V), 0.0
            for state, n_b in states:
                acc.add_(product(state, n_b), alpha=self._weight(n_b))
                count += n_b
                del state
        acc, count = self._reduce(acc, count)
        self._num_data = int(count)
        if self.reduction == "mean":
            acc.div_(count)
        return acc

    def _matvec(self, v: Tensor) -> Tensor:
        return self._apply(v, batched=False)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._apply(V, batched=True)

    # -- dataset quantities --------------------------------------------------------------
    @property
    def num_data(self) -> int:
        """Number of examples ``N`` in the data (summed over ranks)."""
        if self._num_data is None:
            batches = iterate_batches(self.data, self.task)
            count = float(sum(self.task.batch_size(b) for b in batches))
            _, count = self._reduce(torch.zeros(1, dtype=self.dtype, device=self.device), count)
            self._num_data = int(count)
        return self._num_data

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The dataset loss and its flat gradient (detached), reduced like the operator."""
        acc = torch.zeros(self.shape[0] + 1, dtype=self.dtype, device=self.device)
        count = 0.0
        for batch in self._batches():
            n_b = self.task.batch_size(batch)
            _, loss = self._forward(batch)
            g = grad_checked(loss, self.params)
            w = self._weight(n_b)
            acc[:-1].add_(parameters_to_vector(g), alpha=w)
            acc[-1] += w * loss.detach()
            count += n_b
        acc, count = self._reduce(acc, count)
        self._num_data = int(count)
        if self.reduction == "mean":
            acc.div_(count)
        check_finite(acc, "gradient")
        return acc[-1], acc[:-1]

    def gradient(self) -> Tensor:
        """The flat dataset gradient (detached)."""
        return self.loss_and_gradient()[1]

    def refresh(self) -> None:
        """Forget cached graphs (call after changing the parameters in place)."""
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
