"""The curvature of an Influence's data term and the inverse it applies."""

from __future__ import annotations

import torch
from torch import Tensor

from .._errors import NonFiniteError
from .._progress import progress_enabled
from ..distributed import all_ranks
from ..operators.curvature import FisherOperator, GGNOperator, HessianOperator
from ._cache import CacheStore
from ._factors import DEFAULT_MEMORY, StreamedEKFAC, StreamedKFAC
from ._inverse import ApproximationInverse, DenseInverse, IterativeInverse, LowRankInverseStrategy

__all__ = ["CurvatureInverse"]


class CurvatureInverse:
    """The curvature operator, its dense form (sharded, cached) and the inverse strategy.

    A mixin of :class:`~second.Influence`, which holds the settings it reads (``curvature``,
    ``method``, ``damping``, the model, the data) and the sharding and cache helpers.
    """

    @property
    def operator(self):
        """The curvature operator of the data term (without damping)."""
        self._check_model()
        if self._op is None:
            self._op = self._make_operator()
        return self._op

    def _make_operator(self):
        kw = dict(self.curvature_options)
        args = (self.model, self.loss_fn, self.train_data, list(self.fn.params))
        # the task (a custom Task's output and loss) and only a declared reduction: for a
        # plain-function loss the operator's own check that it does not sum then runs
        common = dict(reduction=self._operator_reduction, distributed=False, task=self.task)
        if self.curvature == "hessian":
            return HessianOperator(*args, **common, **kw)
        if self.curvature == "ggn":
            return GGNOperator(*args, **common, **kw)
        if self.curvature == "fisher":
            return FisherOperator(*args, **common, **kw)
        store = CacheStore(self.cache, self.factors_key)
        bar = self._dist()[1] == 0 and progress_enabled(self.progressbar)
        kw.setdefault("progressbar", bar)
        cls = StreamedKFAC if self.curvature == "kfac" else StreamedEKFAC
        if cls is StreamedEKFAC:
            kw.setdefault("memory", self.max_memory or DEFAULT_MEMORY)
        return cls(
            self.model,
            self.loss_fn,
            self.train_data,
            damping=0.0,
            reduction=self._operator_reduction,
            distributed=False,
            task=self.task,
            store=store,
            **kw,
        )

    def _dense_matrix(self) -> Tensor:
        """Form the data curvature densely in float64 (columns sharded over ranks; cached)."""
        name, P = f"curvature-{self.key}", self.fn.numel
        M = None if self.cache is None else self.cache.load_block(name, (P, P), torch.float64)
        if self._dist()[0] and not all_ranks(M is not None, self.fn.device):
            M = None  # a rank without the file (a node-local cache) would wait alone below
        if M is not None:
            return M.to(self.fn.device)
        M = torch.zeros(P, P, dtype=torch.float64, device=self.fn.device)
        with self._collective("the dense curvature"):
            op = self.operator
            step = 256
            starts = list(range(0, P, step))
            for c, s in self._bar(list(enumerate(starts)), len(starts), "curvature"):
                if not self._mine(c):
                    continue
                e = min(s + step, P)
                E = torch.zeros(P, e - s, dtype=self.fn.dtype, device=self.fn.device)
                E[torch.arange(s, e), torch.arange(e - s)] = 1
                M[:, s:e] = (op @ E).to(torch.float64)
            if not bool(torch.isfinite(M).all()):
                raise NonFiniteError("the dense curvature has NaN or Inf entries")
        M = self._gather(M)
        if self.cache is not None and self._dist()[1] == 0:
            self.cache.save_block(name, M)
        return M

    @property
    def inverse(self):
        r"""The object applying :math:`(C + \mu I)^{-1}` to ``[P, k]`` columns."""
        self._check_model()
        if self._inverse is None:
            m = self.resolved_method
            if m == "dense":
                self._inverse = DenseInverse(self._dense_matrix(), self.shift, self.fn.dtype)
            elif m == "lowrank":
                opts = {
                    k: v
                    for k, v in self.solver_options.items()
                    if k in ("complement", "complement_probes", "complement_steps", "eig_tol")
                }
                self._inverse = LowRankInverseStrategy(self.operator, self.shift, self.rank, **opts)
            elif m in ("kfac", "ekfac"):
                inv = self.operator.inverse(damping=self.shift)
                self._inverse = ApproximationInverse(lambda B: inv @ B, self.fn.dtype)
            else:
                tol = self._user_tol if m == "lissa" else self.tol
                self._inverse = IterativeInverse(
                    self.operator, self.shift, m, tol, self.maxiter, self.solver_options
                )
        return self._inverse
