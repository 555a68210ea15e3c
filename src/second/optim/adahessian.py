r"""``second.optim.AdaHessian``: Adam with a Hutchinson Hessian diagonal for the second moment (Yao et al. 2021).

Every ``update_period`` steps :math:`D = |z \odot Hz|` (Rademacher :math:`z`, one
Hessian-vector product), averaged over the spatial dimensions of a convolution kernel
(``spatial_average``: one value per input/output channel pair); then

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) g,\qquad
    v \leftarrow \beta_2 v + (1-\beta_2) D^{2}\ \text{(on estimate steps)},

.. math::

    \theta \leftarrow \theta - \eta\Big(\frac{m/(1-\beta_1^t)}
        {(\sqrt{v/(1-\beta_2^{k})})^{p} + \epsilon} + \lambda_{wd}\,\theta\Big),

with :math:`k` the number of estimates so far and :math:`p` the ``hessian_power``.
The closure is torch.optim's (zero the gradients, compute the loss, call
``loss.backward()``, return the loss): its ``backward()`` is deferred and the optimizer
differentiates the loss with ``create_graph`` on estimate steps
(``loss.backward(create_graph=True)`` in the closure works too).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ._base import check_int, check_nonneg, check_positive, check_unit
from ._preconditioners import DiagonalHessianOptimizer, check_betas, reject_module

__all__ = ["AdaHessian", "adahessian_update"]


def adahessian_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_hessian_sq: Tensor,
    estimate: Tensor | None,
    step: int,
    hessian_step: int,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    hessian_power: float,
    spatial_average: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One AdaHessian update (the functional kernel; new tensors, nothing written in place).

    Args:
        param: the parameter.
        grad: its gradient.
        exp_avg: the first moment.
        exp_avg_hessian_sq: the running :math:`v` of :math:`D^2`.
        estimate: this step's :math:`z \odot Hz`, or ``None``.
        step: the step number :math:`t \ge 1`.
        hessian_step: the number :math:`k` of estimates including this one.
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`.
        eps: the denominator guard :math:`\epsilon`.
        weight_decay: decoupled weight decay :math:`\lambda_{wd}`.
        hessian_power: the power :math:`p \in (0, 1]`.
        spatial_average: average :math:`|z \odot Hz|` over a kernel's spatial dimensions.

    Returns:
        ``(update, exp_avg, exp_avg_hessian_sq)``.

    Example:
        >>> p, g = torch.zeros(2), torch.tensor([2.0, 2.0])
        >>> u, m, v = adahessian_update(p, g, torch.zeros(2), torch.zeros(2), torch.tensor([4.0, -1.0]),
        ...     1, 1, lr=1.0, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0, hessian_power=1.0)
        >>> u   # -g / |D| on the first step (a Newton step on the diagonal)
        tensor([-0.5000, -2.0000])
    """
    b1, b2 = betas
    m = torch.lerp(exp_avg, grad, 1 - b1)
    v = exp_avg_hessian_sq
    if estimate is not None:
        D = estimate.abs()
        if spatial_average and D.dim() > 2:
            D = D.mean(dim=tuple(range(2, D.dim())), keepdim=True).expand_as(D)
        v = torch.lerp(v, D * D, 1 - b2)
    bc2 = 1 - b2 ** max(hessian_step, 1)
    denom = (v / bc2).sqrt().pow(hessian_power).add(eps)
    update = -lr * (m / (1 - b1**step)) / denom
    if weight_decay:
        update = update - (lr * weight_decay) * param
    return update, m, v


class AdaHessian(DiagonalHessianOptimizer):
    r"""AdaHessian (:mod:`second.optim.adahessian`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default ``0.05``, chosen on the zoo of ``benchmarks/bench_zoo.py``;
            the paper's ``0.15`` diverges on the digits CNN).
        betas: :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``).
        eps: the denominator guard (default ``1e-4``, the paper's).
        weight_decay: decoupled weight decay (default ``0.0``).
        hessian_power: the power :math:`p \in (0, 1]` of the denominator (default ``1``).
        update_period: steps between Hessian estimates (default ``1``).
        spatial_average: average the estimate over a kernel's spatial dimensions (default ``True``).
        seed: seed of the Rademacher vectors (plus the rank under torch.distributed).

    Raises:
        ValueError: a hyperparameter out of range.
        TypeError: a model passed instead of its parameters.

    ``step(closure)`` with torch.optim's closure; without one, an estimate step needs
    ``loss.backward(create_graph=True)`` first (else ``RuntimeError``). A non-finite
    gradient, estimate or update refuses the step (parameters and state unchanged,
    ``optimizer.counters['n_refused']``, one ``RuntimeWarning``). Under
    ``torch.distributed`` the estimates are averaged over the ranks.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 1)
        >>> opt = AdaHessian(net.parameters(), lr=0.1)
        >>> X, y = torch.randn(32, 3), torch.randn(32, 1)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(net(X), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure).item()
        >>> for _ in range(40):
        ...     last = opt.step(closure).item()
        >>> last < first
        True

    References:
        Z. Yao et al. ADAHESSIAN: An adaptive second order optimizer for machine learning.
        AAAI 2021.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        *,
        hessian_power: float = 1.0,
        update_period: int = 1,
        spatial_average: bool = True,
        seed: int = 0,
    ):
        reject_module("AdaHessian", params)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            hessian_power=hessian_power,
            update_period=update_period,
            spatial_average=spatial_average,
        )
        _check(defaults)
        super().__init__(params, defaults, seed=seed)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (its hyperparameters validated like the constructor's)."""
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check(g)
        if g["update_period"] != self.param_groups[0]["update_period"]:
            raise ValueError("update_period must be the same in every parameter group")

    def _propose(self, p: Tensor, grad: Tensor, estimate: Tensor | None, group: dict):
        st = self.state[p]
        t = int(st.get("step", 0)) + 1
        k = int(st.get("hessian_step", 0)) + (estimate is not None)
        u, m, v = adahessian_update(
            p, grad, st.get("exp_avg", torch.zeros_like(p)),
            st.get("exp_avg_hessian_sq", torch.zeros_like(p)), estimate, t, k,
            lr=group["lr"], betas=group["betas"], eps=group["eps"],
            weight_decay=group["weight_decay"], hessian_power=group["hessian_power"],
            spatial_average=group["spatial_average"],
        )  # fmt: skip
        return u, {"step": t, "hessian_step": k, "exp_avg": m, "exp_avg_hessian_sq": v}


def _check(g: dict) -> None:
    check_positive("lr", g["lr"])
    check_betas(g["betas"])
    check_nonneg("eps", g["eps"])
    check_nonneg("weight_decay", g["weight_decay"])
    check_unit("hessian_power", g["hessian_power"], closed=True)
    check_int("update_period", g["update_period"])
    if not isinstance(g["spatial_average"], bool):
        raise ValueError(f"spatial_average must be a bool, got {g['spatial_average']!r}")
