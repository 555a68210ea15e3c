r"""Dataset-level curvature operators: Hessian, generalized Gauss-Newton, Fisher.

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
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._errors import NonDeterministicDataError
from .._losses import nll_scale, per_sample_losses, reduction_of, sample_targets
from ..func.products import (
    GGNGraph,
    as_params,
    check_finite,
    check_scalar_loss,
    flatten_gradient,
    grad_checked,
    hvp_from_flat_gradient,
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


def _is_batch(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and (isinstance(data[0], Tensor) or _is_tensor_tuple(data[0]))
        and isinstance(data[1], Tensor)
    )


def _is_tensor_tuple(x) -> bool:
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def _to(x, device):
    if isinstance(x, Tensor):
        return x.to(device)
    return tuple(t.to(device) for t in x)


def _batch_size(X) -> int:
    return (X if isinstance(X, Tensor) else X[0]).shape[0]


def iterate_batches(data, device: torch.device | None = None):
    """Yield ``(X, y)`` batches from one batch or an iterable of batches, with checks."""
    if _is_batch(data):
        batches: Iterable = [data]
    else:
        try:
            batches = iter(data)
        except TypeError:
            raise TypeError(
                "data must be an (X, y) batch of tensors or an iterable of such batches, "
                f"got {type(data).__name__}"
            ) from None
    count = 0
    for batch in batches:
        if not _is_batch(batch):
            raise TypeError(
                f"each batch must be an (X, y) pair of tensors, got {type(batch).__name__}"
            )
        X, y = batch
        if _batch_size(X) == 0:
            continue
        if _batch_size(X) != y.shape[0]:
            raise ValueError(
                f"batch inputs have {_batch_size(X)} examples but targets have {y.shape[0]}"
            )
        count += 1
        yield (_to(X, device), y.to(device)) if device is not None else (X, y)
    if count == 0:
        raise ValueError("the data is empty: it yielded no (non-empty) batch")


def sample_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A private generator for an operator's random samples, never the caller's own.

    A copy of ``generator``'s current state (seed 0 when ``None``): an operator resets it
    before every pass over the data, so its samples, and the matrix, are the same on every
    product, and the caller's generator is neither advanced nor reset.
    """
    private = torch.Generator(device=device)
    if generator is None:
        private.manual_seed(0)
    else:
        private.set_state(generator.get_state())
    return private


def _dist_active(distributed: bool | None) -> bool:
    if distributed is False:
        return False
    active = dist.is_available() and dist.is_initialized()
    if distributed and not active:
        raise RuntimeError("distributed=True but no torch.distributed process group is initialized")
    return active


def _stochastic_modules(model: nn.Module) -> list[str]:
    """Modules that make repeated forward passes differ.

    Dropout and RReLU draw new noise; batch norm in training mode updates its running
    statistics, so each product would change the model's buffers.
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


class CurvatureOperator(LinearOperator):
    """Base class of the dataset-level curvature operators.

    Subclasses implement ``_batch_state(X, y)`` (graphs for one batch) and
    ``_batch_product(state, vs, batched)`` (the batch-level product, reduced like
    the loss). The base class handles parameters, data traversal and weighting,
    determinism checks, distributed reduction and caching.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(X), y)`` returns a scalar.
        data: one ``(X, y)`` batch or an iterable of batches.
        params: tensors to take curvature with respect to (default: every
            parameter of ``model`` with ``requires_grad``).
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

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data,
        params: Sequence[Tensor] | None = None,
        *,
        reduction: str | None = None,
        check_deterministic: bool = True,
        distributed: bool | None = None,
        progressbar: bool = False,
        cache_graphs: bool = False,
        columns: str = "auto",
    ):
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError("the model has no parameters that require grad")
        self.params = as_params(params)
        p0 = self.params[0]
        super().__init__(sum(p.numel() for p in self.params), p0.dtype, p0.device)
        self.model = model
        self.loss_fn = loss_fn
        self.data = data
        self.reduction = reduction_of(loss_fn, reduction)
        self.check_deterministic = check_deterministic
        self.distributed = distributed
        self.progressbar = progressbar
        if columns not in ("auto", "vmap", "loop"):
            raise ValueError(f"columns must be 'auto', 'vmap' or 'loop', got {columns!r}")
        self.columns = columns
        self.cache_graphs = bool(cache_graphs)
        self.single_batch = _is_batch(data)
        if check_deterministic:
            stochastic = _stochastic_modules(model)
            if stochastic:
                raise NonDeterministicDataError(
                    f"the model is in training mode with {', '.join(stochastic[:3])}: every "
                    "product would see a different matrix (dropout, RReLU) or update the "
                    "model's running statistics (batch norm). Call model.eval() first, "
                    "or pass check_deterministic=False if you mean it."
                )
        self._states: list | None = None  # kept per-batch graphs, built lazily
        self._pass_check = SamePassCheck(
            "the data",
            "A curvature operator must be the same matrix on every product: use shuffle=False "
            "or a fixed list of batches, or pass check_deterministic=False.",
        )
        self._num_data: int | None = None

    # -- subclass hooks ------------------------------------------------------------------
    def _batch_state(self, X, y):
        raise NotImplementedError

    def _batch_product(self, state, vs: list[Tensor], batched: bool) -> tuple[Tensor, ...]:
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def _forward(self, X, y) -> tuple[Tensor, Tensor]:
        out = self.model(X) if isinstance(X, Tensor) else self.model(*X)
        loss = self.loss_fn(out, y)
        check_scalar_loss(loss)
        return out, loss

    def _split(self, V: Tensor, batched: bool) -> list[Tensor]:
        out, offset = [], 0
        for p in self.params:
            n = p.numel()
            if batched:
                out.append(V[offset : offset + n].T.reshape(V.shape[1], *p.shape))
            else:
                out.append(V[offset : offset + n].view_as(p))
            offset += n
        return out

    def _join(self, ts: Sequence[Tensor], batched: bool) -> Tensor:
        if batched:
            k = ts[0].shape[0]
            return torch.cat([t.reshape(k, -1) for t in ts], dim=1).T
        return torch.cat([t.reshape(-1) for t in ts])

    def _weight(self, n_b: int) -> float:
        return float(n_b) if self.reduction == "mean" else 1.0

    def _batches(self):
        """Batches with their example counts, checking the data is the same on every pass."""
        it = iterate_batches(self.data, self.device)
        if self.progressbar and not self.single_batch:
            from tqdm.auto import tqdm

            it = tqdm(it, desc=type(self).__name__, leave=False)
        if self.check_deterministic and not self.single_batch:
            it = self._pass_check(it)
        yield from it

    def _reduce(self, acc: Tensor, count: float) -> tuple[Tensor, float]:
        if _dist_active(self.distributed):
            buf = torch.cat([acc.reshape(-1), acc.new_tensor([count])])
            dist.all_reduce(buf)
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

    def _kept_states(self) -> list:
        if self._states is None:
            if self.single_batch:
                batches = iterate_batches(self.data, self.device)
            else:
                batches = self._batches()
            self._states = [(self._batch_state(X, y), _batch_size(X)) for X, y in batches]
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
            if not _dist_active(self.distributed):
                return out
            acc, count = out * self._weight(n_b), float(n_b)
        else:
            if self.cache_graphs:
                states = self._kept_states()
            else:
                states = ((self._batch_state(X, y), _batch_size(X)) for X, y in self._batches())
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
            count = float(sum(_batch_size(X) for X, _ in iterate_batches(self.data)))
            _, count = self._reduce(torch.zeros(1, dtype=self.dtype, device=self.device), count)
            self._num_data = int(count)
        return self._num_data

    def loss_and_gradient(self) -> tuple[Tensor, Tensor]:
        """The dataset loss and its flat gradient (detached), reduced like the operator."""
        acc = torch.zeros(self.shape[0] + 1, dtype=self.dtype, device=self.device)
        count = 0.0
        for X, y in self._batches():
            n_b = _batch_size(X)
            _, loss = self._forward(X, y)
            g = grad_checked(loss, self.params)
            w = self._weight(n_b)
            acc[:-1].add_(torch.cat([t.reshape(-1) for t in g]), alpha=w)
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


def batch_fingerprint(X, y, ordered: bool = False) -> tuple:
    """A cheap fingerprint of a batch: per tensor its shape, sum and sum of squares.

    With ``ordered`` it also holds a position-weighted sum over the examples, so a batch
    whose examples were permuted gets a different fingerprint (the sums alone are
    invariant to the order, which is all a curvature operator depends on).
    """
    xs = [X] if isinstance(X, Tensor) else list(X)
    fp = []
    for t in [*xs, y]:
        tf = t.detach().to(torch.float64)
        item = (tuple(t.shape), round(float(tf.sum()), 6), round(float((tf * tf).sum()), 6))
        if ordered and tf.dim() > 0 and tf.shape[0] > 0:
            pos = torch.arange(1, tf.shape[0] + 1, dtype=torch.float64, device=tf.device)
            per = tf.reshape(tf.shape[0], -1).sum(1)
            item = (*item, round(float(pos @ per), 6))
        fp.append(item)
    return tuple(fp)


class SamePassCheck:
    """Checks that an iterable of batches yields the same batches on every pass.

    The first complete pass records each batch's :func:`batch_fingerprint`; every later
    pass is compared batch by batch and raises :class:`~second.NonDeterministicDataError`
    at the first difference (a shuffling ``DataLoader``, random augmentation) or when
    the number of batches changes. Calling the object wraps an iterator of ``(X, y)``.

    A list of batches yields the same tensor objects on every pass: the same objects with
    the same autograd version counters hold the same values, and hashing them again is
    skipped. A ``DataLoader`` collates new tensors, which are fingerprinted afresh.

    Args:
        what: how the data is named in the error message.
        hint: what the user can do, appended to the message.
        ordered: also detect a permutation of the examples within a batch (needed where
            results are indexed by example, as influence scores are).
    """

    def __init__(self, what: str = "the data", hint: str = "", ordered: bool = False):
        self.what, self.hint, self.ordered = what, hint, ordered
        self.fingerprints: list[tuple] | None = None
        self._tensors: dict[int, tuple] = {}  # batch i: (weakrefs, versions) last seen

    def __call__(self, batches):
        seen = []
        for i, (X, y) in enumerate(batches):
            fp = self._fingerprint(i, X, y)
            if self.fingerprints is not None:
                if i >= len(self.fingerprints) or fp != self.fingerprints[i]:
                    raise NonDeterministicDataError(
                        f"batch {i} of {self.what} differs from the one seen on the first pass "
                        f"(a shuffling DataLoader or random augmentation?). {self.hint}".rstrip()
                    )
            seen.append(fp)
            yield X, y
        if self.fingerprints is None:
            self.fingerprints = seen
        elif len(seen) != len(self.fingerprints):
            raise NonDeterministicDataError(
                f"{self.what} yielded {len(seen)} batches, {len(self.fingerprints)} on the first "
                f"pass. {self.hint}".rstrip()
            )

    def _fingerprint(self, i: int, X, y) -> tuple:
        ts = [X, y] if isinstance(X, Tensor) else [*X, y]
        known = self._tensors.get(i)
        if known is not None and self.fingerprints is not None and i < len(self.fingerprints):
            refs, versions = known
            if len(refs) == len(ts) and all(
                r() is t and t._version == v for r, t, v in zip(refs, ts, versions, strict=True)
            ):
                return self.fingerprints[i]
        fp = batch_fingerprint(X, y, self.ordered)
        self._tensors[i] = (tuple(weakref.ref(t) for t in ts), tuple(t._version for t in ts))
        return fp


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
    def _batch_state(self, X, y):
        _, loss = self._forward(X, y)
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

    def _batch_state(self, X, y):
        out, loss = self._forward(X, y)
        return GGNGraph(loss, out, self.params)

    def _batch_product(self, state, vs, batched):
        return state.gvp(vs, batched)


class _FisherState:
    def __init__(self, op: FisherOperator, X, y):
        out, _ = op._forward(X, y)
        n = out.shape[0]
        w = 1.0 / n if op.reduction == "mean" else 1.0
        self.w = w
        self.out_dim = out.dim()
        if op.kind == "empirical":
            losses = per_sample_losses(op.loss_fn, out, y, op.reduction)
            self.graph = _JacobianGraph(losses, op.params)
            self.scores = self.outer = None
        else:
            a = nll_scale(op.loss_fn, out, op.reduction)
            # all K samples of all n examples in one batch of K * n (one backward, no loop)
            K = op.mc_samples
            f = out.detach().unsqueeze(0).expand(K, *out.shape).reshape(K * n, *out.shape[1:])
            f = f.clone().requires_grad_(True)
            yt = sample_targets(op.loss_fn, f, op._sampler)
            ls = per_sample_losses(op.loss_fn, f, yt, op.reduction)
            (s,) = torch.autograd.grad(ls.sum(), f)
            self.scores = s.reshape(K, *out.shape)  # [K, n, ...]
            self.w = w / (a * op.mc_samples)
            # with few outputs per example, sum the K outer products once: [n, m, m]
            m = out[0].numel()
            Sf = self.scores.reshape(K, n, m)
            self.outer = torch.einsum("kni,knj->nij", Sf, Sf) if m <= K else None
            self.graph = _JacobianGraph(out, op.params)


class _JacobianGraph:
    """``J v`` (double-vjp) and ``J^T t`` for a tensor ``out`` of the parameters."""

    def __init__(self, out: Tensor, params):
        self.out, self.params = out, params
        self.dummy = torch.zeros_like(out, requires_grad=True)
        self.u = grad_checked(out, params, self.dummy, create_graph=True)

    def jvp(self, vs, batched):
        live = [i for i, u in enumerate(self.u) if u.requires_grad]
        shape = (vs[0].shape[0], *self.out.shape) if batched else self.out.shape
        if not live:
            return self.out.new_zeros(shape)
        (jv,) = torch.autograd.grad(
            [self.u[i] for i in live],
            self.dummy,
            [vs[i] for i in live],
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return self.out.new_zeros(shape) if jv is None else jv

    def vjp(self, t, batched):
        return grad_checked(
            self.out,
            self.params,
            t,
            retain_graph=True,
            is_grads_batched=batched,
            zeros_for_unused=True,
        )


class FisherOperator(CurvatureOperator):
    r"""The Fisher matrix, empirical or Monte-Carlo.

    * ``kind="empirical"``: :math:`w \sum_i \nabla\ell_i \nabla\ell_i^\top` with the observed
      targets (per-example losses as in :mod:`second._losses`).
    * ``kind="mc"``: :math:`\frac{w}{a K} \sum_i \sum_k J_i^\top s_{ik} s_{ik}^\top J_i`
      with :math:`s_{ik} = \nabla_f \ell(f_i, \tilde y_{ik})`, targets :math:`\tilde y_{ik}`
      sampled from the model's predictive distribution (``mc_samples`` of them). Every
      product draws the same samples, so the operator is one fixed matrix. Its expectation
      is the GGN. Supported for MSE, cross-entropy and BCE-with-logits.

    Args:
        kind: ``"empirical"`` (default) or ``"mc"``.
        mc_samples: samples per example for ``"mc"``.
        generator: a ``torch.Generator`` whose state at construction seeds the samples
            (default: seed 0). The operator draws from a private copy of that state
            (:func:`sample_generator`), so ``generator`` itself is never advanced or reset.
        other arguments: see :class:`CurvatureOperator`.

    Example:
        >>> model = torch.nn.Linear(3, 4).double()
        >>> X, y = torch.randn(50, 3, dtype=torch.float64), torch.randint(0, 4, (50,))
        >>> F = FisherOperator(model, torch.nn.CrossEntropyLoss(), (X, y), kind="mc",
        ...                    mc_samples=1000)
        >>> G = GGNOperator(model, torch.nn.CrossEntropyLoss(), (X, y)).to_dense()
        >>> float((F.to_dense() - G).norm() / G.norm()) < 0.1   # E[MC Fisher] = GGN
        True
    """

    psd = True

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        kind: str = "empirical",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        **kwargs,
    ):
        if kind not in ("empirical", "mc"):
            raise ValueError(f"kind must be 'empirical' or 'mc', got {kind!r}")
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        super().__init__(model, loss_fn, data, params, **kwargs)
        self.kind = kind
        self.mc_samples = int(mc_samples)
        self.generator = generator
        self._sampler = sample_generator(generator, self.device)
        self._sampler_state = self._sampler.get_state()

    def _batch_state(self, X, y):
        return _FisherState(self, X, y)

    def _apply(self, V, batched):
        # the same samples on every pass over the data: the operator is one fixed matrix
        self._sampler.set_state(self._sampler_state)
        return super()._apply(V, batched)

    def _batch_product(self, state: _FisherState, vs, batched):
        jv = state.graph.jvp(vs, batched)
        if state.scores is None:
            t = jv * state.w
        elif state.outer is not None:
            n, m = state.outer.shape[:2]
            jf = jv.reshape(*jv.shape[: jv.dim() - state.out_dim], n, m)
            t = torch.einsum("nij,...nj->...ni", state.outer, jf).reshape(jv.shape) * state.w
        else:
            S = state.scores  # [K, n, ...]
            n = S.shape[1]
            Sf = S.reshape(S.shape[0], n, -1)
            if batched:
                jf = jv.reshape(jv.shape[0], 1, n, -1)
                coef = (Sf.unsqueeze(0) * jf).sum(-1, keepdim=True)  # [k, K, n, 1]
                t = (coef * Sf.unsqueeze(0)).sum(1).reshape(jv.shape) * state.w
            else:
                jf = jv.reshape(1, n, -1)
                coef = (Sf * jf).sum(-1, keepdim=True)
                t = (coef * Sf).sum(0).reshape(jv.shape) * state.w
        return state.graph.vjp(t, batched)
