"""What an Influence's results depend on: staleness checks and the cache key."""

from __future__ import annotations

from .._losses import reduction_of
from ..data import refuse_stochastic
from ..func.per_example import ModelFunction
from ._cache import fingerprint
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
        mode, the loss function's settings or ``version``.
        """
        refuse_stochastic(self.model, "every influence result would change from call to call")
        self.fn = ModelFunction(self.model, self.task)
        self.reduction = reduction_of(self.loss_fn)
        self.weight = 1.0 / self.n_train if self.reduction == "mean" else 1.0
        self._op = None
        self._inverse = None
        self._ihvp_memo: dict = {}  # inverse-HVPs (and Kronecker queries) by test set
        self._identity = self._current_identity()
        self._key = None
        self._factors_key: str | None = None

    def _current_identity(self) -> tuple[str, str]:
        """Digests of the setup (loss, module tree, forward code, version) and of the state."""
        setup = fingerprint(setup_description(self.model, self.loss_fn, self.version))
        return setup, fingerprint(state_tensors(self.model))

    def _check_model(self) -> None:
        if self._current_identity() != self._identity:
            self.refresh()

    @property
    def train_digest(self) -> str:
        """A SHA-256 digest of the training data, in order (computed once)."""
        if self._train_digest is None:
            self._train_digest = self.train.digest(self.batch_size)
        return self._train_digest

    @property
    def key(self) -> str:
        """The cache key: a digest of everything that determines the results.

        The loss function (class and settings), the model's module tree with the code of
        every ``forward`` and the modules' modes, ``version``, every parameter (trainable
        or frozen) and buffer, the training data (when caching) and every setting.
        """
        if self._key is None:
            self._key = fingerprint(
                "influence-v4",
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
            "influence-factors-v1",
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
