"""What an Influence's results depend on: staleness checks and the cache key."""

from __future__ import annotations

import torch
from torch import Tensor

from ..data import refuse_stochastic
from ..func.per_example import ModelFunction
from ._cache import fingerprint
from ._checks import _refuse_batch_coupled
from ._examples import Examples
from ._identity import setup_description, state_tensors

__all__ = ["StateTracking"]


class StateTracking:
    """Refreshes :class:`~second.Influence` when its model changed, and keys its cache.

    A mixin: the host holds the model, the loss, the task, the data and the settings the
    key digests.
    """

    def refresh(self) -> None:
        """Forget the curvature, its inverse and cached vectors (after changing the model).

        Called automatically when anything the results depend on changed since they were
        computed: a parameter (trainable or frozen), a buffer, the module tree, a module's
        mode, the loss function's settings, the task's code, ``version``, or a single
        training batch changed by an in-place operation. A single training batch is read
        again (call this after writing to it through ``.data`` or a NumPy view).
        """
        self._refresh(reread=True)

    def _refresh(self, reread: bool) -> None:
        refuse_stochastic(self.model, "every influence result would change from call to call")
        _refuse_batch_coupled(self.model)
        if reread and self.train.single:
            self._read_train()
        self.fn = ModelFunction(self.model, self.task)
        self._op = None
        self._inverse = None
        self._ihvp_memo: dict = {}  # inverse-HVPs (and Kronecker queries) by test set
        self._identity = self._current_identity()
        self._key = None
        self._factors_key: str | None = None

    def _read_train(self) -> None:
        """Read the training data: the examples, their number and weights :math:`w_j`."""
        self.train = Examples(
            self.train_data, "training data", self.task, self.fn.device, self.loss_fn
        )
        self.n_train = self.train.n
        self._train_digest: str | None = None
        self._set_weights()

    def _set_weights(self) -> None:
        r"""Each training example's share :math:`w_j` of the training objective.

        ``weights`` (``[n]``, float64): :math:`W_j / W` for a mean (:math:`W_j` what
        torch's mean counts example :math:`j` as, :math:`W` their sum), 1 for a sum.
        ``weight``: their common value when all are equal (``1/n`` for a plain mean,
        computed as such), else ``None``.
        """
        n, W = self.n_train, self.train.mean_weights
        if self.reduction == "sum":
            self.weight: float | None = 1.0
            self.weights: Tensor = torch.ones(n, dtype=torch.float64)
            return
        if W is None or (bool((W == W[0]).all()) and float(W[0]) > 0):
            self.weight = 1.0 / n
            self.weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
            return
        total = float(W.sum())
        if total == 0:
            raise ValueError(
                "training data: every target is the loss' ignore_index (or of class weight 0), "
                "so torch's mean training loss is 0/0: there is nothing to attribute"
            )
        self.weight = None
        self.weights = W / total

    def _weigh(self, block: Tensor, start: int) -> Tensor:
        """``block [rows, c]`` with column ``k`` times :math:`w_{start+k}` (0 for weight 0)."""
        if self.weight is not None:
            return self.weight * block
        w = self.weights[start : start + block.shape[1]].to(block)
        return torch.where(
            w == 0, torch.zeros((), dtype=block.dtype, device=block.device), block * w
        )

    def _current_identity(self) -> tuple[str, str]:
        """Digests of the setup (loss, module tree, forward code, task, version) and the state."""
        setup = setup_description(self.model, self.loss_fn, self.version, self.task)
        return fingerprint(setup), fingerprint(state_tensors(self.model))

    def _check_model(self) -> None:
        if self.train.changed():  # a single training batch changed in place
            self.refresh()
        elif self._current_identity() != self._identity:
            self._refresh(reread=False)

    @property
    def train_digest(self) -> str:
        """A SHA-256 digest of the training data, in order (computed once per reading)."""
        if self._train_digest is None:
            self._train_digest = self.train.digest(self.batch_size)
        return self._train_digest

    @property
    def key(self) -> str:
        """The cache key: a digest of everything that determines the results.

        The loss function (class and settings), the model's module tree with the code of
        every ``forward`` and the modules' modes, the task (its class, settings and the
        code of every method a :class:`~second.Task` subclass defines), ``version``, every
        parameter (trainable or frozen) and buffer, the training data (when caching) and
        every setting. Not seen: globals and helper functions that a ``forward``, the loss
        or the task calls (change ``version`` when they change).
        """
        if self._key is None:
            self._key = fingerprint(
                "influence-v6",
                self.factors_key,
                self.method,
                self.damping,
                self.rank,
                self.tol,
                self.maxiter,
                self.solver_options,
                self.batch_size,
                str(self.score_dtype),
                self.query_rank,
            )
        return self._key

    @property
    def factors_key(self) -> str:
        """The cache key of the fitted curvature.

        :attr:`key` without the settings of the solve and the scores (damping, method,
        tolerances, batch size, score options).
        """
        if self._factors_key is not None:
            return self._factors_key
        train = self.train_digest if self.cache is not None else self.n_train
        self._factors_key = fingerprint(
            "influence-factors-v3",
            type(self.task).__module__,
            type(self.task).__qualname__,
            {k: v for k, v in vars(self.task).items() if k != "loss_fn"},
            self._identity,
            self.curvature,
            self.curvature_options,
            self.reduction,
            train,
        )
        return self._factors_key
