r"""The Jacobian of a model's outputs on a dataset, and its transpose, as operators.

For a model :math:`f(x; \theta)` and data :math:`x_1, \dots, x_N`, the Jacobian stacks
the outputs of every example into one vector of :math:`M = N C` entries (``C`` output
entries per example) and differentiates it with respect to the flat parameters:

.. math:: J = \frac{\partial}{\partial \theta}
          \begin{pmatrix} f(x_1; \theta) \\ \vdots \\ f(x_N; \theta) \end{pmatrix}
          \in \mathbb{R}^{M \times P}.

Rows are ordered batch by batch, each batch's output ``[n_b, ...]`` flattened in row-major
order, so ``J @ v`` lines up with ``torch.cat([model(X_b).flatten() for X_b in batches])``.
:class:`JacobianOperator` is :math:`J` (``M x P``) and :class:`TransposedJacobianOperator`
is :math:`J^\top` (``P x M``); ``J.T`` of one is the other, sharing its graphs. With them
the generalized Gauss-Newton matrix is :math:`J^\top (\nabla^2_f L) J`.

Products run on kept graphs as the curvature operators' do (the same data traversal,
:mod:`._traversal`): on a single batch the graph is built once and ``J v`` costs one
backward pass through the double-vjp graph, ``J^T u`` one backward pass through the
forward graph; a matrix of ``k`` columns is one vmap-batched pass. Over an iterable of
batches every product traverses the data again (or keeps every batch's graphs with
``cache_graphs=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._errors import NonDeterministicDataError
from ..data import Task, as_task
from ..func.products import JacobianGraph, check_finite
from ._traversal import DataTraversal
from .base import LinearOperator

__all__ = ["JacobianOperator", "TransposedJacobianOperator"]


class _Jacobian(DataTraversal):
    """The shared state of ``J`` and ``J^T``: parameters, data traversal and kept graphs.

    The traversal (:mod:`._traversal`) keeps one :class:`~second.func.graphs.JacobianGraph`
    per batch; the messages and the progress bar name ``JacobianOperator``.
    """

    _kind = _varies = "Jacobian"

    def __init__(
        self,
        model: nn.Module,
        data,
        params: Sequence[Tensor] | None,
        check_deterministic: bool,
        progressbar: bool,
        cache_graphs: bool,
        columns: str,
        task: Task | None = None,
    ):
        self.num_params, self.dtype, self.device = self._take_params(model, data, params)
        if columns not in ("vmap", "loop"):
            raise ValueError(f"columns must be 'vmap' or 'loop', got {columns!r}")
        self.columns = columns
        if isinstance(data, Tensor):  # a batch of inputs without targets
            data = (data, data.new_empty((data.shape[0] if data.dim() else 0, 0)))
        task = as_task(task, None)
        self._init_traversal(model, data, task, check_deterministic, progressbar, cache_graphs)
        if self.single_batch or self.cache_graphs:
            self.output_shapes = [tuple(g.out.shape) for g in self._kept_states()]
        else:  # one pass without graphs to learn the number of rows
            with torch.no_grad():
                self.output_shapes = [tuple(self._forward(b).shape) for b in self._batches()]
        self.num_outputs = sum(int(torch.Size(s).numel()) for s in self.output_shapes)

    def _traversal_name(self) -> str:
        return "JacobianOperator"

    # -- data ----------------------------------------------------------------------------
    def _forward(self, batch) -> Tensor:
        out = self.task.output(self.model, batch)
        if not isinstance(out, Tensor):
            raise TypeError(f"the model must return one tensor, got {type(out).__name__}")
        if out.dtype != self.dtype:
            raise TypeError(f"the model returns {out.dtype}, its parameters are {self.dtype}")
        return check_finite(out, "model output")

    def _batch_state(self, batch) -> JacobianGraph:
        return JacobianGraph(self._forward(batch), self.params)

    def _graphs(self):
        """Every batch's graph with its number of rows, checked against the first pass."""
        if self.single_batch or self.cache_graphs:
            graphs = iter(self._kept_states())
        else:
            graphs = self._states_of(self._batches())
        count = 0
        for i, graph in enumerate(graphs):
            if i >= len(self.output_shapes) or tuple(graph.out.shape) != self.output_shapes[i]:
                raise NonDeterministicDataError(
                    f"batch {i} of the data gives an output of shape {tuple(graph.out.shape)}, "
                    "not the one seen when the operator was built: the rows of the Jacobian "
                    "would not line up"
                )
            count += 1
            yield graph, graph.out.numel()
        if count != len(self.output_shapes):
            raise NonDeterministicDataError(
                f"the data yielded {count} batches, {len(self.output_shapes)} when the operator "
                "was built"
            )

    # -- products ------------------------------------------------------------------------
    def jvp(self, V: Tensor) -> Tensor:
        """``J V`` for ``V`` of shape ``[P]`` or ``[P, k]``."""
        if V.dim() == 2 and self.columns == "loop":
            return torch.stack([self.jvp(V[:, j]) for j in range(V.shape[1])], dim=1)
        batched = V.dim() == 2
        vs = self._split(V, batched)
        pieces = []
        for graph, _ in self._graphs():
            jv = graph.jvp(vs, batched)
            pieces.append(jv.reshape(V.shape[1], -1) if batched else jv.reshape(-1))
        out = torch.cat(pieces, dim=-1)
        return out.T if batched else out

    def vjp(self, U: Tensor) -> Tensor:
        """``J^T U`` for ``U`` of shape ``[M]`` or ``[M, k]``."""
        if U.dim() == 2 and self.columns == "loop":
            return torch.stack([self.vjp(U[:, j]) for j in range(U.shape[1])], dim=1)
        batched = U.dim() == 2
        shape = (self.num_params, U.shape[1]) if batched else (self.num_params,)
        acc = U.new_zeros(shape)
        offset = 0
        for graph, rows in self._graphs():
            block = U[offset : offset + rows]
            if batched:
                t = block.T.reshape(U.shape[1], *graph.out.shape)
            else:
                t = block.view(graph.out.shape)
            acc.add_(self._join(graph.vjp(t, batched), batched))
            offset += rows
        return acc


class _JacobianBase(LinearOperator):
    """What :class:`JacobianOperator` and :class:`TransposedJacobianOperator` share."""

    _transposed = False

    def __init__(
        self,
        model: nn.Module,
        data,
        params: Sequence[Tensor] | None = None,
        *,
        check_deterministic: bool = True,
        progressbar: bool = False,
        cache_graphs: bool = False,
        columns: str = "vmap",
        task: Task | None = None,
    ):
        core = _Jacobian(
            model, data, params, check_deterministic, progressbar, cache_graphs, columns, task
        )
        self._init_from(core)

    def _init_from(self, core: _Jacobian) -> None:
        shape = (core.num_outputs, core.num_params)
        super().__init__(shape[::-1] if self._transposed else shape, core.dtype, core.device)
        self._core = core
        self.symmetric = False
        self.psd = False

    @property
    def model(self) -> nn.Module:
        """The network."""
        return self._core.model

    @property
    def data(self):
        """The data the operator traverses."""
        return self._core.data

    @property
    def params(self) -> tuple[Tensor, ...]:
        """The parameters differentiated with respect to."""
        return self._core.params

    @property
    def num_outputs(self) -> int:
        """``M``, the number of output entries over all examples."""
        return self._core.num_outputs

    @property
    def output_shapes(self) -> list[tuple[int, ...]]:
        """The output shape of each batch, in the order of the rows."""
        return list(self._core.output_shapes)

    @property
    def num_data(self) -> int:
        """The number of examples ``N``."""
        return sum(s[0] if s else 1 for s in self._core.output_shapes)

    def refresh(self) -> None:
        """Forget kept graphs.

        An in-place change of a parameter through autograd (``optimizer.step()``) is noticed
        by the next product, which rebuilds them; a write through ``p.data`` is not: call
        ``refresh()`` after one.
        """
        self._core.refresh()

    def _jacobian(self, V: Tensor) -> Tensor:
        return self._core.vjp(V) if self._transposed else self._core.jvp(V)

    def _jacobian_t(self, U: Tensor) -> Tensor:
        return self._core.jvp(U) if self._transposed else self._core.vjp(U)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._jacobian(v)

    def _matmat(self, V: Tensor) -> Tensor:
        return self._jacobian(V)

    def _rmatvec(self, u: Tensor) -> Tensor:
        return self._jacobian_t(u)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._jacobian_t(U)

    def adjoint(self) -> LinearOperator:
        """The transposed operator on the same data and graphs."""
        if self._adjoint is None:
            cls = JacobianOperator if self._transposed else TransposedJacobianOperator
            other = cls.__new__(cls)
            other._init_from(self._core)
            other._adjoint = self
            self._adjoint = other
        return self._adjoint


class JacobianOperator(_JacobianBase):
    r"""The Jacobian :math:`J = \partial f / \partial \theta` of a model's outputs on the data.

    An ``M x P`` operator: ``M`` is the number of output entries over all examples (``N C``
    for ``N`` examples of ``C`` outputs), ``P`` the number of parameters. Row ``(b, i)`` is
    the output entry ``i`` of example ``b``, batches in the order the data yields them, so

    .. math:: (J v)_{(b, i)} = \sum_j \frac{\partial f_i(x_b; \theta)}{\partial \theta_j} v_j .

    ``J @ v`` is a forward-mode product (double-vjp on the kept graph), ``J.T @ u`` a
    backward pass; ``J.T`` is the :class:`TransposedJacobianOperator` on the same graphs.
    Data on this process only: a ``torch.distributed`` run is not reduced over ranks.

    Args:
        model: the network; ``model(X)`` (or ``model(*X)`` for a tuple of inputs) returns
            one tensor whose first dimension indexes the examples.
        data: a tensor of inputs ``X``, one ``(X, y)`` batch, or an iterable of such
            batches (a ``DataLoader``); targets are ignored, so the data of a curvature
            operator can be passed as it is.
        params: tensors to differentiate with respect to (default: every parameter of
            ``model`` with ``requires_grad``).
        check_deterministic: refuse a stochastic model (dropout in training mode) and verify
            that an iterable yields the same batches on every pass (default ``True``).
        progressbar: show a tqdm bar over batches for each product (default ``False``).
        cache_graphs: over an iterable, keep every batch's graphs (memory grows with the
            dataset's activations; default ``False``); a single batch always keeps its graph.
        columns: ``"vmap"`` (default; one vmap-batched backward pass for a matrix of
            columns) or ``"loop"`` (one pass per column, for models without batching rules).
        task: how to run the model on a batch (:class:`second.Task`; default: ``(X, y)``
            pairs and dicts of tensors); only its ``output`` is used.

    Attributes:
        num_outputs: ``M``.
        output_shapes: the output shape of each batch.

    Raises:
        ValueError: no parameters, a parameter not in the graph of the output, an unknown
            ``columns``.
        TypeError: a model that does not return one tensor, or returns another dtype.
        NonDeterministicDataError: a stochastic model, or data that changes between passes.

    Example:
        >>> model = torch.nn.Linear(2, 1)         # f(x) = w^T x + c
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> J = JacobianOperator(model, X)
        >>> J.shape
        (2, 3)
        >>> J.to_dense()                          # row b: df(x_b)/d(w, c) = [x_b^T, 1]
        tensor([[1., 2., 1.],
                [3., 4., 1.]])
        >>> J.T @ torch.tensor([1.0, 1.0])
        tensor([4., 6., 2.])
    """


class TransposedJacobianOperator(_JacobianBase):
    r"""The transposed Jacobian :math:`J^\top` (``P x M``) of a model's outputs on the data.

    Takes the arguments of :class:`JacobianOperator`, whose ``.T`` is the same operator on
    shared graphs. :math:`J^\top u = \nabla_\theta\, u^\top f` is one backward pass, so
    :math:`J^\top \nabla_f L` is the gradient of a loss of the outputs.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> JT = TransposedJacobianOperator(model, X)
        >>> JT.shape, JT @ torch.tensor([1.0, -1.0])
        ((3, 2), tensor([-2., -2.,  0.]))
        >>> type(JT.T).__name__
        'JacobianOperator'
    """

    _transposed = True
