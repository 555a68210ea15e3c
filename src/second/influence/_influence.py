"""The Influence class (the derivation is in the :mod:`second.influence` docstring)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, overload

import torch
from torch import Tensor, nn

from .._deprecation import warn_deprecated
from .._errors import NonFiniteError
from .._losses import reduction_of
from ..data import Task, as_task, refuse_stochastic
from ..distributed import check_same_across_ranks
from ..func.per_example import ModelFunction, check_rows_finite
from ..solvers import choose_method
from ._cache import DiskCache, chunk_digest
from ._checks import _real, _refuse_batch_coupled, _warn_if_summing
from ._curvature import CurvatureInverse
from ._examples import Examples, _gradients, _ranks, warn_ignored, zero_rows
from ._kronecker import KroneckerScoring
from ._loo import newton_loo
from ._sharding import ShardedWork
from ._state import StateTracking

__all__ = ["Influence", "TopK"]

CURVATURES = ("hessian", "ggn", "fisher", "kfac", "ekfac")
METHODS = ("auto", "dense", "cg", "minres", "lissa", "lowrank")
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


class TopK(NamedTuple):
    """The most helpful and most harmful training points for each test point.

    Attributes:
        helpful_scores: ``[n_test, k]`` largest scores (removing the point would raise
            the test loss the most), descending.
        helpful_indices: ``[n_test, k]`` their training indices.
        harmful_scores: ``[n_test, k]`` smallest (most negative) scores, ascending.
        harmful_indices: ``[n_test, k]`` their training indices.
    """

    helpful_scores: Tensor
    helpful_indices: Tensor
    harmful_scores: Tensor
    harmful_indices: Tensor


class Influence(StateTracking, CurvatureInverse, KroneckerScoring, ShardedWork):
    r"""Influence of training points on test losses, for any ``nn.Module``.

    ``scores[i, j]`` estimates how much the loss on test point ``i`` would change if
    training point ``j`` were removed and the model retrained (module docstring for the
    derivation):

    .. math:: \texttt{scores[i, j]} = w_j\, \nabla\ell^{\mathrm{test}}_i{}^\top
              (C + \mu I)^{-1} \nabla\ell_j

    with :math:`C` the curvature of the data term (``curvature``), :math:`\mu` the
    ``damping``, :math:`\ell_j` the loss of example :math:`j` alone and :math:`w_j` its
    share of the training objective: :math:`w_j = W_j / W` for a loss with
    ``reduction="mean"``, where :math:`W_j` is what torch's mean counts example :math:`j` as
    (1; for ``CrossEntropyLoss``/``NLLLoss`` with class indices the class weights of its
    valid targets: its class weight, or its number of non-ignored positions) and
    :math:`W = \sum_j W_j` (so :math:`w_j = 1/n` for a plain mean), and :math:`w_j = 1` for
    ``"sum"``. :math:`w_j \nabla\ell_j` is the gradient of example :math:`j`'s term in
    the loss torch computes on all the training data at once; an example of weight 0 (every
    target ignored, or class weight 0) has influence 0. **Positive: j helped test point i**
    (removing it would raise the loss); negative: j hurt it.

    .. warning::
        Include the weight decay the model was trained with in ``damping`` (objective
        ``mean loss + (lambda/2) ||theta||^2``; for ``torch.optim`` with
        ``weight_decay=lambda`` on the mean loss that is ``lambda``). It is the L2 term's
        Hessian :math:`\lambda I`, while the per-example terms :math:`\ell_j` stay the data
        losses alone (removing a point keeps the L2 term). Forgetting it leaves the
        curvature of a different objective: in measured runs the leave-one-out correlation
        drops from 1.00 to about 0.92. Anything beyond :math:`\lambda` is a numerical
        device that biases every score towards zero; keep it as small as the method allows.

    Args:
        model: the trained network. Put it in ``eval()`` mode (dropout makes every
            curvature product a different matrix).
        loss_fn: ``loss_fn(model(X), y)`` -> scalar, e.g. ``nn.CrossEntropyLoss()``. The
            per-example loss :math:`\ell_j` is the loss of a batch of one, weighted by
            :math:`w_j` (above).
        reduction: how ``loss_fn`` reduces a batch: ``"mean"`` or ``"sum"`` (default
            ``None``: ``loss_fn.reduction``, else ``"mean"``). Declare it for a plain function
            that sums (``lambda o, t: ((o - t) ** 2).sum()``): undeclared, such a function is
            taken for a mean and a ``UserWarning`` says that its value looks like a sum. A
            value that contradicts ``loss_fn.reduction`` raises ``ValueError``.
        train_data: the training set: one batch, an iterable of batches (a ``DataLoader``
            with ``shuffle=False``) or a map-style ``Dataset`` (:mod:`second.data`).
            ``(X, y)`` pairs and dicts of tensors (targets under ``"labels"``) work as they
            are; other batches through ``task``.
        task: how to run the model on a batch, its loss and the measurement attributed on
            test data (:class:`second.Task`; default: the loss of ``(X, y)`` pairs and dicts).
        curvature: ``"hessian"`` (default), ``"ggn"`` (generalized Gauss-Newton, positive
            semi-definite), ``"fisher"`` (empirical Fisher; ``curvature_options={"fisher":
            "mc"}`` for the Monte-Carlo one), ``"kfac"``, ``"ekfac"`` (Kronecker-factored,
            from :mod:`second.kfac`).
        method: how to apply the inverse: ``"auto"`` (``"dense"`` up to 1500 parameters,
            else ``"cg"`` for a positive semi-definite curvature and ``"minres"``
            otherwise), ``"dense"`` (float64 eigendecomposition, exact), ``"cg"``,
            ``"minres"``, ``"lissa"`` (automatic scale and depth), ``"lowrank"`` (top
            ``rank`` eigenpairs plus the exact complement term; needs
            ``damping > 0``). Ignored for ``"kfac"``/``"ekfac"``.
        damping: :math:`\mu \ge 0`, added to the curvature as :math:`\mu I` (default 0):
            the training run's L2 coefficient plus any numerical damping. Any real scalar
            (a Python or NumPy number, a 0-d NumPy array or tensor).
        regularization: the deprecated spelling of (a part of) ``damping``: it is added to
            it, with a ``SecondDeprecationWarning`` (removal in 0.3; pass the sum as
            ``damping``).
        rank: eigenpairs for ``method="lowrank"`` (default 50).
        tol: relative tolerance of iterative solves (default 1e-10 in float64, 1e-5 in
            float32; for LiSSA, the predicted truncation bias, default 1e-6 from
            :func:`second.solve`).
        maxiter: iteration limit of iterative solves (solver default when ``None``).
        solver_options: extra keywords for :func:`second.solve` (e.g. ``{"depth": 5000}``
            for LiSSA); for ``method="lowrank"``, ``complement`` (``"zero"``, ``"mean"``,
            ``"harmonic"``, ``"weighted"`` or a number: the eigenvalue given to the
            directions outside the top ``rank``, see :func:`second.lowrank`;
            ``"weighted"`` suits gradients best), ``complement_probes``,
            ``complement_steps`` and ``eig_tol``.
        curvature_options: extra keywords for the curvature operator's constructor.
        batch_size: examples per vmapped per-example-gradient call, and the chunk size of
            the training data (memory ``O(batch_size * P)`` plus the result).
        cache_dir: directory for inverse-HVPs, the dense curvature and score blocks. Every
            file is written atomically and keyed by everything that determines it (see
            :attr:`key`), so an interrupted :meth:`scores` call resumes where it stopped;
            a file that does not hold exactly the expected block (shape, dtype, name,
            content digest) is ignored with a warning and recomputed
            (``docs/reliability.md``). ``"kfac"``/``"ekfac"`` store their factors (after
            each pass, keyed by :attr:`factors_key`: another ``damping`` reuses them), query
            gradients and score blocks as ``.safetensors`` files.
        progressbar: progress bars with totals (rank 0 only); ``None`` (default) follows
            :func:`second.set_progress` (bars at a terminal only), ``True``/``False`` force it.
        distributed: shard the work over the ``torch.distributed`` process group (default:
            when one is initialized). Every rank passes the same data (checked: a
            ``ValueError`` on every rank otherwise); each computes its share of test
            inverse-HVPs, dense-curvature columns and training chunks, and the results are
            gathered so every rank returns the full tensor. A rank that raises during its
            share makes the others raise ``RuntimeError`` instead of waiting for it.
        version: a tag for what the cache key cannot see (default ``None``): the key
            covers the loss function's class and settings, the model's module tree and
            the code of every ``forward``, the task's class, settings and the code of every
            method a :class:`~second.Task` subclass defines, all parameters and buffers,
            but not globals or helper functions a ``forward``, the loss or the task calls.
            Change ``version`` when those change.
        score_dtype: the dtype of the products and of the scores of ``"kfac"``/``"ekfac"``
            (default ``None``: the model's; ``torch.bfloat16`` or ``torch.float16`` halve
            the memory and time of the products at a loss of precision).
        query_rank: for ``"kfac"``/``"ekfac"``, sketch every layer's preconditioned query
            gradient (a ``[d_out, d_in]`` matrix) by its top ``query_rank`` singular
            triplets (default ``None``: exact). The scores then cost
            :math:`O(n (d_{out} + d_{in})\,q\,r)` instead of :math:`O(n\, d_{out} d_{in}\, q)`.
        max_memory: bytes one intermediate block of the scores (and of the EK-FAC
            corrections) may take; the query block and the examples per block follow from
            it (default ``None``: a sixty-fourth of the available memory, between 8 and
            16 MiB). It changes the speed, not the result.

    Raises:
        ValueError: on an unknown ``curvature``/``method``, negative ``damping`` or
            ``regularization``, empty or mismatched data, a model without trainable
            parameters, training data of no weight in the mean (every target ignored),
            a batch-coupled model (batch norm without running statistics), or
            different data on different ranks.
        NonDeterministicDataError: if the model is in training mode with dropout, or the
            data changes between passes (a shuffling ``DataLoader``), for every curvature.
        NonFiniteError: (from the methods) when a test or training example has a
            non-finite gradient (NaN or Inf in its input or loss), naming the examples.

    Warns:
        UserWarning: when training examples have every target equal to the loss'
            ``ignore_index`` (or of class weight 0): their weight, gradient and influence
            are zero; when a ``loss_fn`` without ``.reduction`` looks like a sum.

    The training data is read when the results need it: a single ``(X, y)`` batch changed
    in place (an in-place torch operation, which bumps the tensors' version counters) is
    read again, and everything computed from it is recomputed. Writes through ``.data`` or a
    NumPy view are not seen: call :meth:`refresh` after them. An iterable of batches must
    not change (a ``NonDeterministicDataError`` otherwise).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(20, 3, dtype=torch.float64), torch.randint(0, 2, (20,))
        >>> inf = Influence(model, torch.nn.CrossEntropyLoss(), (X, y), damping=0.1,
        ...                 progressbar=False)
        >>> inf.scores((X[:2], y[:2])).shape
        torch.Size([2, 20])
        >>> bool((inf.self_influence() > 0).all())
        True

    References:
        Koh & Liang, *Understanding Black-box Predictions via Influence Functions*, ICML 2017.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data,
        *,
        curvature: str = "hessian",
        method: str = "auto",
        damping: float = 0.0,
        regularization: float | None = None,
        rank: int = 50,
        tol: float | None = None,
        maxiter: int | None = None,
        solver_options: dict | None = None,
        curvature_options: dict | None = None,
        batch_size: int = 256,
        cache_dir: str | os.PathLike | None = None,
        progressbar: bool | None = None,
        distributed: bool | None = None,
        version: str | int | None = None,
        task: Task | None = None,
        score_dtype: torch.dtype | None = None,
        query_rank: int | None = None,
        max_memory: int | None = None,
        reduction: str | None = None,
    ):
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        damping = _real(damping, "damping")
        if regularization is not None:  # not a rename: added to damping, so both may be given
            damping = damping + _real(regularization, "regularization")
            warn_deprecated(
                "Influence(regularization=...)",
                "damping=...",
                detail="it is added to damping, the one name for the multiple of the identity "
                "added to the curvature: pass their sum as damping",
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if query_rank is not None and (not isinstance(query_rank, int) or query_rank < 1):
            raise ValueError(f"query_rank must be an int >= 1 or None, got {query_rank!r}")
        if max_memory is not None and (not isinstance(max_memory, int) or max_memory < 1):
            raise ValueError(f"max_memory must be a number of bytes >= 1, got {max_memory!r}")
        if score_dtype is not None and not (
            isinstance(score_dtype, torch.dtype) and score_dtype.is_floating_point
        ):
            raise ValueError(f"score_dtype must be a floating torch.dtype, got {score_dtype!r}")
        self.score_dtype, self.query_rank = score_dtype, query_rank
        self.max_memory = max_memory
        refuse_stochastic(model, "every influence result would change from call to call")
        _refuse_batch_coupled(model)
        self.model, self.loss_fn = model, loss_fn
        self.version = version
        self.task = as_task(task, loss_fn)
        self.fn = ModelFunction(model, self.task)
        loss = self.task.loss_fn if self.task.loss_fn is not None else loss_fn
        own = getattr(loss, "reduction", None)
        if reduction is not None and reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean', 'sum' or None, got {reduction!r}")
        if reduction is not None and isinstance(own, str) and own != reduction:
            raise ValueError(
                f"reduction={reduction!r} contradicts the loss' own reduction {own!r}: leave "
                f"reduction=None or set {type(loss).__name__}(reduction={reduction!r})"
            )
        # what the operators are told: only a reduction that the user or the loss declares,
        # so that for a plain function their own check that it does not sum runs too
        self._operator_reduction = (
            reduction if reduction is not None else (own if isinstance(own, str) else None)
        )
        self.reduction = reduction_of(loss, reduction)
        self.curvature, self.method = curvature, method
        self.damping = damping
        self.rank = int(rank)
        self._user_tol = tol
        self.tol = tol if tol is not None else DEFAULT_TOL.get(self.fn.dtype, 1e-5)
        self.maxiter = maxiter
        self.solver_options = dict(solver_options or {})
        self.curvature_options = dict(curvature_options or {})
        self.batch_size = int(batch_size)
        self.progressbar = progressbar
        self.train_data = train_data
        self._read_train()
        warn_ignored(self.train, loss_fn)
        if self._operator_reduction is None and loss is not None:
            if _warn_if_summing(self.task, model, train_data, self.fn.device):
                self._operator_reduction = "mean"  # warned once: not again by the operator
        self._distributed = distributed
        self.cache = DiskCache(cache_dir) if cache_dir is not None else None
        self._identity: tuple[str, str] | None = None
        self._refresh(reread=False)
        if self._dist()[0]:
            check_same_across_ranks("training data", self.train_digest, self.fn.device)

    @property
    def shift(self) -> float:
        r"""The multiple of the identity added to the data curvature: :math:`\mu` (``damping``)."""
        return self.damping

    @property
    def resolved_method(self) -> str:
        """The method ``"auto"`` resolves to (``"kfac"``/``"ekfac"`` for those curvatures)."""
        if self.curvature in ("kfac", "ekfac"):
            return self.curvature
        if self.method != "auto":
            return self.method
        psd = self.curvature in ("ggn", "fisher")
        op = self.operator if psd else None
        return choose_method(op, self.fn.numel, self.shift)

    def _apply_inverse(self, B: Tensor) -> Tensor:
        return self.inverse(B)

    # -- public API ------------------------------------------------------------------------
    def _test(self, test_data) -> Examples:
        ex = Examples(test_data, "test data", self.task, self.fn.device, self.loss_fn)
        if ex.example_shapes == self.train.example_shapes:
            return ex
        # other sizes can be fine (another sequence length, image size): the same tensors,
        # with as many dimensions each, on which the model and the loss run
        shapes = (
            f"test examples have input/target shapes {ex.example_shapes} but training "
            f"examples have {self.train.example_shapes}"
        )
        if _ranks(ex.example_shapes) != _ranks(self.train.example_shapes):
            raise ValueError(f"{shapes}: they need the same tensors, each with as many dimensions")
        one = ex.take([0])[0]
        try:
            with torch.no_grad():
                self.task.measurement(self.model, one)
        except Exception as err:
            raise ValueError(f"{shapes}, and the model or the loss fails on them: {err}") from err
        return ex

    def _test_zero_rows(self, test: Examples, start: int, stop: int) -> Tensor | None:
        """The test examples of weight zero in ``start:stop`` whose loss is the measurement."""
        if type(self.task).measurement is not Task.measurement:
            return None
        return test.zero_weight(start, stop)

    def inverse_hvps(self, test_data) -> Tensor:
        r"""Return :math:`(C + \mu I)^{-1} \nabla\ell^{\mathrm{test}}_i`, one row each.

        Computed once per test set and kept (in memory, and in ``cache_dir`` when given):
        later calls with the same test data, parameters and settings return them at once.

        Args:
            test_data: an ``(X, y)`` batch or an iterable of batches.

        Returns:
            A ``[n_test, P]`` tensor in the model's dtype.
        """
        self._check_model()
        test = self._test(test_data)
        tkey = test.digest(self.batch_size)
        self._same_on_all_ranks("test data", tkey)
        warn_ignored(test, self.loss_fn)
        if tkey in self._ihvp_memo:
            return self._ihvp_memo[tkey]
        if self._dist()[0]:
            self.inverse  # noqa: B018 - built by every rank (the dense one is sharded)
        V = torch.zeros(test.n, self.fn.numel, dtype=self.fn.dtype, device=self.fn.device)
        P = self.fn.numel

        def body(c: int, s: int, chunk) -> None:
            name, rows = f"ihvp-{self.key}-{tkey}-{c}", self.task.batch_size(chunk)
            block = None
            if self.cache is not None:
                block = self.cache.load_block(name, (rows, P), self.fn.dtype)
            if block is None:
                G = self.fn.gradients(chunk, measure=True)
                G = zero_rows(G, self._test_zero_rows(test, s, s + rows))
                G = check_rows_finite(G, "test example", s)
                block = self._apply_inverse(G.T.contiguous()).T.contiguous()
                check_rows_finite(block, "inverse-HVP of test example", s)
                if self.cache is not None:
                    self.cache.save_block(name, block)
            V[s : s + rows] = block.to(V)

        self._each_chunk(test, "inverse-HVPs", body)
        V = self._gather(V)
        self._ihvp_memo[tkey] = V
        return V

    def _train_pass(self, fn: Callable, rows: int, tag: str | None, desc: str) -> Tensor:
        """Fill ``[rows, n_train]`` chunk by chunk: ``fn(G_chunk, start) -> [rows, c]``; cached.

        ``G_chunk`` are the per-example gradients, zero for the examples of weight zero.
        """
        out = torch.zeros(rows, self.n_train, dtype=self.fn.dtype, device=self.fn.device)

        def body(c: int, s: int, chunk) -> None:
            name = f"{tag}-{c}" if (tag and self.cache is not None) else None
            nb, block = self.task.batch_size(chunk), None
            meta = {"data": chunk_digest(chunk)} if name is not None else None
            if name is not None:
                block = self.cache.load_block(name, (rows, nb), self.fn.dtype, meta)
            if block is None:
                G = zero_rows(_gradients(self.fn, chunk), self.train.zero_weight(s, s + nb))
                G = check_rows_finite(G, "training example", s)
                block = fn(G, s)
                if not bool(torch.isfinite(block).all()):
                    raise NonFiniteError(
                        f"{desc} of training examples {s}..{s + nb - 1} are not finite"
                    )
                if name is not None:
                    self.cache.save_block(name, block, meta)
            out[:, s : s + nb] = block.to(out)

        self._each_chunk(self.train, desc, body)
        return self._gather(out)

    @overload
    def scores(self, test_data, *, per_module: Literal[False] = False) -> Tensor: ...

    @overload
    def scores(self, test_data, *, per_module: Literal[True]) -> dict[str, Tensor]: ...

    def scores(self, test_data, *, per_module: bool = False) -> Tensor | dict[str, Tensor]:
        r"""Influence of every training point on every test point.

        .. math:: \texttt{scores[i, j]} = w_j\, \nabla\ell^{\mathrm{test}}_i{}^\top
                  (C + \mu I)^{-1} \nabla\ell_j
                  \approx \ell^{\mathrm{test}}_i(\hat\theta_{-j})
                  - \ell^{\mathrm{test}}_i(\hat\theta)

        Positive: removing ``j`` raises test loss ``i`` (``j`` helped). The training data
        is traversed once, in chunks of ``batch_size``; with ``cache_dir`` every finished
        chunk is stored, so an interrupted call resumes. The test side is the task's
        :meth:`~second.Task.measurement` (by default the loss; any function of the output).

        With ``curvature="kfac"``/``"ekfac"`` the training gradients stay in Kronecker
        form (input rows and output gradients of every layer, :mod:`second.influence`),
        so the memory is that of one chunk and a block of ``max_memory`` bytes, not
        ``batch_size`` dense gradients; ``score_dtype`` and ``query_rank`` apply.

        Args:
            test_data: an ``(X, y)`` batch or an iterable of batches.
            per_module: return a dict of ``[n_test, n_train]`` scores, one per
                Kronecker-factored block (its module's name in ``model.named_modules()``;
                attention's query, key and value projections as ``"<name>.q"``, ``".k"``,
                ``".v"``) and one per other trainable parameter (its name), which sum to
                the scores (``"kfac"``/``"ekfac"`` only).

        Returns:
            A ``[n_test, n_train]`` tensor in the model's dtype (``score_dtype`` if set),
            or the dict of per-module scores.

        Raises:
            ValueError: if the test examples' tensors differ in number or dimensions from the
                training examples', or ``per_module`` with another curvature.
        """
        if self.curvature in ("kfac", "ekfac"):
            parts = self._kronecker_scores(test_data)
            if per_module:
                return parts
            vals = list(parts.values())
            total = vals[0].clone()
            for v in vals[1:]:
                total += v
            return total
        if per_module:
            raise ValueError("per_module scores need curvature='kfac' or 'ekfac'")
        V = self.inverse_hvps(test_data)
        tkey = self._test(test_data).digest(self.batch_size)
        return self._train_pass(
            lambda G, s: self._weigh(V @ G.T, s), V.shape[0], f"scores-{self.key}-{tkey}", "scores"
        )

    def self_influence(self) -> Tensor:
        r"""Each training point's influence on its own loss, without the ``n x n`` matrix.

        .. math:: s_j = w_j\, \nabla\ell_j^\top (C + \mu I)^{-1} \nabla\ell_j

        (the change of :math:`\ell_j` when :math:`j` is removed; non-negative for a
        positive-definite curvature; large values flag outliers and mislabeled points).
        With an explicit inverse (dense, low rank, Kronecker-factored) this is cheap; the
        iterative methods need one solve per training point.

        Returns:
            A ``[n_train]`` tensor.
        """
        self._check_model()
        if self.curvature in ("kfac", "ekfac"):
            return self._kronecker_self_influence()
        if self._dist()[0]:
            self.inverse  # noqa: B018 - built by every rank (the dense one is sharded)

        def quad(G: Tensor, s: int) -> Tensor:
            X = self._apply_inverse(G.T.contiguous())
            return self._weigh((G.T * X).sum(0).unsqueeze(0), s)

        return self._train_pass(quad, 1, f"self-{self.key}", "self-influence")[0]

    def top_k(self, test_data, k: int = 5) -> TopK:
        """Return the ``k`` most helpful and ``k`` most harmful training points per test point.

        Args:
            test_data: an ``(X, y)`` batch or an iterable of batches.
            k: how many of each (capped at ``n_train``).

        Returns:
            A :class:`TopK` of ``[n_test, k]`` tensors.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.n_train)
        S = self.scores(test_data)
        bad = (~torch.isfinite(S)).any(1).nonzero().reshape(-1).tolist()
        if bad:  # the scores are checked as they are computed; this guards any other path
            raise NonFiniteError(f"the scores of test example(s) {bad[:10]} are not finite")
        hv, hi = torch.topk(S, k, dim=1, largest=True)
        lv, li = torch.topk(S, k, dim=1, largest=False)
        return TopK(hv, hi, lv, li)

    def newton_loo(self, test_data, train_indices: Sequence[int] | Tensor) -> Tensor:
        r"""Estimate the leave-one-out change more sharply for chosen training points.

        One Newton step on the leave-one-out objective, with its exact curvature,

        .. math:: \Delta_j = (C + \mu I - w_j\,C_j)^{-1}\, w_j\nabla\ell_j,

        (:math:`w_j C_j` example :math:`j`'s term in the chosen curvature: :math:`C_j` its
        Hessian or GGN alone (the GGN for K-FAC and EK-FAC); for the empirical Fisher, whose
        terms are quadratic in the weighted gradients, :math:`C_j = n w_j \nabla\ell_j
        \nabla\ell_j^\top` for a mean, :math:`\nabla\ell_j\nabla\ell_j^\top` for a sum),
        and the test loss to second order,

        .. math:: \ell^{\mathrm{test}}_i(\hat\theta_{-j}) - \ell^{\mathrm{test}}_i(\hat\theta)
                  \approx \nabla\ell^{\mathrm{test}\top}_i \Delta_j
                  + \tfrac12 \Delta_j^\top \nabla^2\ell^{\mathrm{test}}_i\, \Delta_j.

        ``method="dense"`` solves with the dense matrix; the others run preconditioned CG
        (MINRES for the Hessian) from the first-order solution, preconditioned by the
        first-order inverse when it is explicit. Same sign convention as :meth:`scores`.
        Assumes the model is at a stationary point of the regularized objective. When the
        leave-one-out curvature of a point is not positive definite (removing it leaves no
        strict minimum nearby: seen on non-convex models), the Newton step is unbounded along
        the negative direction; that point falls back to the first-order step, with a
        :class:`~second.NegativeCurvatureWarning`.

        Args:
            test_data: an ``(X, y)`` batch or an iterable of batches.
            train_indices: training indices (typically the top of :meth:`top_k`).

        Returns:
            A ``[n_test, len(train_indices)]`` tensor.

        Raises:
            IndexError: if an index is outside ``[0, n_train)``.
        """
        return newton_loo(self, test_data, train_indices)
