r"""Tuning the prior precision during training, as a ``torch.optim`` step hook."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._errors import ConvergenceWarning
from ..func.vectors import parameters_to_vector
from ._laplace import Laplace

__all__ = ["OnlinePrior"]


class OnlinePrior:
    r"""Marginal-likelihood tuning of the prior precision while a network trains.

    The scheme of Immer et al. (2021): every ``every`` optimizer steps (after ``burnin``
    steps) a :class:`Laplace` approximation is fitted at the current parameters and the prior
    precision is moved to the maximiser of its log marginal likelihood
    (:meth:`Laplace.optimize_prior_precision`). The training objective uses it through
    :meth:`penalty`, the negative log prior
    :math:`\tfrac12 \sum_g \delta_g \|\theta_g - \mu_0\|^2`: add ``penalty() / N`` to a
    mean-reduced loss (the MAP objective of the summed negative log-likelihood, divided by
    ``N``). Registered with :meth:`torch.optim.Optimizer.register_step_post_hook`, so the
    training loop only adds the penalty.

    Args:
        optimizer: the optimizer whose steps are counted.
        model: the network (put in eval mode while the approximation is fitted, then back).
        loss_fn: ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``.
        data: the training data (one batch or an iterable of batches).
        every: steps between updates (default 100).
        burnin: steps before the first update (default 0).
        method: ``"mackay"`` (default) or ``"gradient"``.
        per_group: one prior precision per group of parameters (default: a scalar).
        maxiter: iterations of each optimisation (default 20: a few updates suffice while
            training, the next call continues from the current value; an optimisation that
            stops there does not warn).
        prior_precision: the starting value (default 1).
        laplace_options: further :class:`Laplace` arguments (default ``subset="all"``,
            ``structure="kfac"``: the whole network's marginal likelihood).

    Attributes:
        prior_precision: the current value; history: ``(step, prior_precision, LML)`` of every
        update; steps: optimizer steps seen.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Linear(3, 2).double()
        >>> X, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> prior = OnlinePrior(opt, model, torch.nn.CrossEntropyLoss(), (X, y), every=5)
        >>> for _ in range(10):
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(X), y) + prior.penalty() / 32
        ...     loss.backward()
        ...     opt.step()
        >>> len(prior.history)
        2
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        data,
        *,
        every: int = 100,
        burnin: int = 0,
        method: str = "mackay",
        per_group: bool = False,
        maxiter: int = 20,
        prior_precision: float | Tensor = 1.0,
        **laplace_options,
    ):
        if every < 1 or burnin < 0:
            raise ValueError(f"every must be >= 1 and burnin >= 0, got {every} and {burnin}")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.every, self.burnin, self.method = int(every), int(burnin), method
        self.per_group, self.maxiter = per_group, int(maxiter)
        self.options = {"subset": "all", "structure": "kfac", **laplace_options}
        # an unfitted approximation: checks the options and names the groups
        self._template = Laplace(
            model, loss_fn, None, prior_precision=prior_precision, **self.options
        )
        self.prior_precision = self._template.prior_precision
        self.history: list[tuple[int, Tensor, float]] = []
        self.steps = 0
        self._handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps > self.burnin and (self.steps - self.burnin) % self.every == 0:
            self.update()

    def update(self) -> Laplace:
        """Fit the approximation at the current parameters and move the prior precision.

        Returns:
            The fitted :class:`Laplace` (with the new prior precision).
        """
        training = self.model.training
        self.model.eval()
        try:
            la = Laplace(
                self.model,
                self.loss_fn,
                self.data,
                prior_precision=self.prior_precision,
                **self.options,
            )
            with warnings.catch_warnings():  # a few iterations per update, by design
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = la.optimize_prior_precision(
                    self.method, per_group=self.per_group, maxiter=self.maxiter
                )
        finally:
            self.model.train(training)
        self.prior_precision = res.prior_precision
        self.history.append((self.steps, res.prior_precision, res.log_marginal_likelihood))
        return la

    def penalty(self) -> Tensor:
        r""":math:`\tfrac12 \sum_g \delta_g \|\theta_g - \mu_0\|^2` at the current parameters (differentiable)."""
        t = self._template
        d = self.prior_precision.to(t.params[0].dtype)
        theta = parameters_to_vector(t.params)
        mu = t.prior_mean.to(theta.dtype)
        gi = t._group_index
        prior = d.expand(gi.shape) if d.dim() == 0 else d[gi]
        return 0.5 * (prior * (theta - mu) ** 2).sum()

    def remove(self) -> None:
        """Unregister the hook."""
        self._handle.remove()
