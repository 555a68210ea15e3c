r"""``second.optim.Sophia`` and ``SophiaH``: clipped diagonal-Hessian momentum (Liu et al. 2023).

Every step, with gradient :math:`g` and every ``update_period`` steps a diagonal curvature
estimate :math:`\hat h`:

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g,\qquad
    h \leftarrow \beta_2 h + (1-\beta_2) \hat h \ \text{(on estimate steps)},

.. math::

    \theta \leftarrow \theta (1 - \eta\lambda_{wd})
        - \eta\,\mathrm{sign}(m)\,\min\!\Big(\frac{|m|}{\max(\rho h, \epsilon)},\, 1\Big).

The step per coordinate is at most :math:`\eta`; where the estimate is negative or tiny the
step is a sign step. The estimators:

* ``Sophia`` (Sophia-G): Gauss-Newton-Bartlett, :math:`\hat h = \hat g \odot \hat g` with
  :math:`\hat g` the gradient of the loss at targets sampled from the model
  (:func:`second.optim._diagonal.gnb_diagonal`), an unbiased estimate of the GGN
  diagonal; built on the model and its loss, ``Sophia(model, loss_fn)``.
* ``SophiaH``: Hutchinson, :math:`\hat h = z \odot Hz` with Rademacher :math:`z`, unbiased for
  the Hessian diagonal; built on parameters, ``SophiaH(model.parameters())``.

Both take torch.optim's closure (zero the gradients, compute the loss, call
``loss.backward()``, return the loss): the optimizer defers the closure's ``backward()`` and
differentiates the loss itself, with ``create_graph`` only on the steps that estimate
(``loss.backward(create_graph=True)`` in the closure works too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..kfac import check_loss, unwrap_model, watch_forward
from ._diagonal import DiagonalHessianOptimizer, gnb_diagonal
from ._options import check_nonneg, check_positive
from ._preconditioned import decoupled_update, hyperparameters
from ._views import depends_on, loss_input, watch_loss

__all__ = ["Sophia", "SophiaH", "sophia_update"]


def sophia_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    hessian: Tensor,
    estimate: Tensor | None,
    *,
    lr: float,
    betas: tuple[float, float],
    rho: float,
    eps: float,
    weight_decay: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One Sophia update (the functional kernel; new tensors, nothing written in place).

    Args:
        param: the parameter :math:`\theta`.
        grad: its gradient.
        exp_avg: the momentum :math:`m`.
        hessian: the running diagonal :math:`h`.
        estimate: this step's diagonal estimate :math:`\hat h`, or ``None``.
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        rho: the clipping scale :math:`\rho`.
        eps: the denominator guard :math:`\epsilon`.
        weight_decay: decoupled weight decay.

    Returns:
        ``(update, exp_avg, hessian)``: the parameter moves by ``update``.

    Example:
        >>> p, g = torch.zeros(2), torch.tensor([1.0, -1.0])
        >>> u, m, h = sophia_update(p, g, torch.zeros(2), torch.zeros(2), torch.tensor([100.0, 0.0]),
        ...                         lr=0.1, betas=(0.0, 0.0), rho=1.0, eps=1e-12, weight_decay=0.0)
        >>> u   # |m|/h = 0.01 on the first coordinate; a clipped sign step on the second
        tensor([-0.0010,  0.1000])
    """
    b1, b2 = betas
    m = torch.lerp(exp_avg, grad, 1 - b1)
    h = hessian if estimate is None else torch.lerp(hessian, estimate, 1 - b2)
    ratio = (m.abs() / (rho * h).clamp_min(eps)).clamp_max(1.0)
    return decoupled_update(m.sign() * ratio, param, lr, weight_decay), m, h


class _SophiaBase(DiagonalHessianOptimizer):
    def _check_group(self, g: dict) -> None:
        super()._check_group(g)
        check_nonneg("rho", g["rho"])
        check_positive("eps", g["eps"])

    def _propose(self, p: Tensor, grad: Tensor, estimate: Tensor | None, group: dict):
        st = self.state[p]
        m = st.get("exp_avg", torch.zeros_like(p))
        h = st.get("hessian", torch.zeros_like(p))
        u, m, h = sophia_update(
            p, grad, m, h, estimate,
            lr=group["lr"], betas=group["betas"], rho=group["rho"], eps=group["eps"],
            weight_decay=group["weight_decay"],
        )  # fmt: skip
        return u, {"step": int(st.get("step", 0)) + 1, "exp_avg": m, "hessian": h}


class SophiaH(_SophiaBase):
    r"""Sophia with Hutchinson's Hessian-diagonal estimate (:mod:`second.optim.sophia`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta`, the largest step per coordinate (default ``3e-3``).
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.965, 0.99)``, the paper's).
        rho: the clipping scale :math:`\rho` (default ``0.04``).
        eps: the denominator guard :math:`\epsilon` (default ``1e-12``).
        weight_decay: decoupled weight decay (default ``0.0``).
        update_period: steps between Hessian estimates (default ``10``; the first step estimates).
        seed: seed of the Rademacher vectors (plus the rank under torch.distributed).

    Raises:
        ValueError: a hyperparameter out of range.
        TypeError: a model passed instead of its parameters.

    ``step(closure)`` with torch.optim's closure; without one, a Hessian step needs
    ``loss.backward(create_graph=True)`` first (else ``RuntimeError``). A non-finite
    gradient, estimate or update refuses the step (parameters and state unchanged,
    ``optimizer.counters['n_refused']``, one ``RuntimeWarning``). Under
    ``torch.distributed`` the estimates are averaged over the ranks.

    A parameter the loss does not use gets no gradient and is skipped, as in torch.optim
    (no step, no state). A parameter added (or unfrozen) between two estimates has
    :math:`h = 0` until the next one: its steps are the clipped ones,
    :math:`\eta\,\mathrm{sign}(m)`. The closure's ``backward()`` is deferred and the
    returned loss differentiated: more ``backward()`` calls (gradient accumulation) or
    ``.grad`` edits in the closure (``clip_grad_norm_``) are ignored, with one
    ``UserWarning`` (return the sum of the micro-batch losses instead).

    Example:
        Without a closure, from a gradient with its graph; the exact curvature here is
        ``[2, 8]``, and a Newton step (length 2) is clipped to ``lr``:

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = SophiaH([w], lr=0.5, betas=(0.0, 0.0), rho=1.0)
        >>> loss = (torch.tensor([2.0, 8.0]) * (w - 3) ** 2).sum() / 2
        >>> (w.grad,) = torch.autograd.grad(loss, [w], create_graph=True)
        >>> opt.step()
        >>> w.detach()
        tensor([1.5000, 1.5000])

    References:
        H. Liu et al. Sophia: A scalable stochastic second-order optimizer for language
        model pre-training. ICLR 2024.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        update_period: int = 10,
        seed: int = 0,
    ):
        super().__init__(params, hyperparameters(locals()), seed=seed)


class Sophia(_SophiaBase):
    r"""Sophia-G: Sophia with the Gauss-Newton-Bartlett estimate (:mod:`second.optim.sophia`).

    Args:
        model: the network; its output (the last forward call in the closure) feeds the
            estimate.
        loss_fn: the training loss (``nn.CrossEntropyLoss``, ``nn.MSELoss`` or
            ``nn.BCEWithLogitsLoss``, mean or sum), applied to that output.
        lr: learning rate :math:`\eta`, the largest step per coordinate (default ``3e-3``).
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.965, 0.99)``, the paper's).
        rho: the clipping scale :math:`\rho` (default ``0.04``).
        eps: the denominator guard :math:`\epsilon` (default ``1e-12``).
        weight_decay: decoupled weight decay (default ``0.0``).
        update_period: steps between estimates (default ``10``; the first step estimates).
        params: parameters or parameter groups (default ``model.parameters()``).
        seed: seed of the sampled targets (plus the rank under torch.distributed).

    Raises:
        ValueError: a hyperparameter out of range.
        NotImplementedError: a loss without a known output curvature.

    ``step(closure)`` needs the closure on the estimate steps (``RuntimeError`` otherwise).
    Safety, unused parameters, the closure and torch.distributed as in :class:`SophiaH`.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net, loss_fn = torch.nn.Linear(4, 3), torch.nn.CrossEntropyLoss()
        >>> opt = Sophia(net, loss_fn, lr=0.05)
        >>> X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = loss_fn(net(X), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure).item()
        >>> for _ in range(40):
        ...     last = opt.step(closure).item()
        >>> last < first
        True

    References:
        H. Liu et al. Sophia: A scalable stochastic second-order optimizer for language
        model pre-training. ICLR 2024.
    """

    _estimator = "gnb"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        *,
        update_period: int = 10,
        params: Iterable | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                "Sophia takes the model and its loss, Sophia(model, loss_fn); for parameters "
                "only use SophiaH(model.parameters())"
            )
        check_loss(loss_fn, "mc")
        defaults = hyperparameters(locals())
        super().__init__(model.parameters() if params is None else params, defaults, seed=seed)
        self.loss_fn = loss_fn
        self._output: Tensor | None = None
        # what the loss module saw: the output or a view of it (logits.reshape(-1, V)), and
        # the targets, for the estimate's curvature columns
        self._loss_input: tuple[Tensor, Tensor | None] | None = None
        self._watch = watch_forward(unwrap_model(model), self._before, self._after)
        self._loss_hook = watch_loss(loss_fn, self._on_loss)

    def _before(self, module: nn.Module, args: tuple) -> None:
        pass

    def _after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            self._output = output
            self._loss_input = None

    def _on_loss(self, args: tuple, kwargs: dict, output) -> None:
        """Keep the first loss call, with gradients, on the output (or computed from it)."""
        if self._output is None or self._loss_input is not None or not torch.is_grad_enabled():
            return
        x, target = loss_input(args, kwargs)
        if x is not None and x.requires_grad and depends_on(x, self._output):
            self._loss_input = (x, target)

    def close(self) -> None:
        """Remove the forward hooks from the model and the loss."""
        self._watch.remove()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None

    def _gradients(self, closure: Callable | None, due: bool):
        self._output = self._loss_input = None
        try:
            return super()._gradients(closure, due)
        finally:
            self._output = self._loss_input = None

    def _estimate(self, loss, grads, params):
        if self._output is None:
            raise RuntimeError(
                "Sophia saw no forward pass of its model in the closure (with gradients on)"
            )
        # the loss' own input (a view of the output: its classes where the loss has them)
        # and targets (ignored ones weigh 0), where the loss module saw them
        f, y = self._loss_input if self._loss_input is not None else (self._output, None)
        return gnb_diagonal(f, self.loss_fn, params, self.generator(params[0].device), y)
