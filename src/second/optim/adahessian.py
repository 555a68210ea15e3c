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

from ._diagonal import DiagonalHessianOptimizer
from ._options import check_unit
from ._preconditioned import decoupled_update, hyperparameters

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
    return decoupled_update((m / (1 - b1**step)) / denom, param, lr, weight_decay), m, v


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

    The closure, the refused steps (``optimizer.counters['n_refused']``) and
    torch.distributed work as for :class:`~second.optim.SophiaH`. A parameter without a
    gradient (not used by the loss) is skipped: no step, no state.

    A parameter's first step always takes its first estimate, also with ``update_period > 1``
    off the schedule (a group added with ``add_param_group``, a parameter unfrozen or first
    used late): the update divides by the estimate, and without one it would be
    :math:`\eta\,\hat m/\epsilon`. That step costs one more gradient with its graph and one
    Hessian-vector product (estimates for the other parameters stay on their schedule).
    Without a closure the first estimate needs ``loss.backward(create_graph=True)``; until a
    step brings one, the parameter is not stepped (its state stays empty).

    Example:
        On a separable quadratic the estimate is exact and the first step with
        ``betas=(0, 0)`` is Newton's: the minimum in one step.

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = AdaHessian([w], lr=1.0, betas=(0.0, 0.0), eps=0.0)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = (torch.tensor([2.0, 8.0]) * (w - 3) ** 2).sum() / 2
        ...     loss.backward()
        ...     return loss
        >>> _ = opt.step(closure)
        >>> w.detach()
        tensor([3., 3.])

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
        defaults = hyperparameters(locals())
        super().__init__(params, defaults, seed=seed)

    def _check_group(self, g: dict) -> None:
        super()._check_group(g)
        check_unit("hessian_power", g["hessian_power"], closed=True)
        if not isinstance(g["spatial_average"], bool):
            raise ValueError(f"spatial_average must be a bool, got {g['spatial_average']!r}")

    def _needs_estimate(self, p: Tensor) -> bool:
        # without an estimate v = 0 and the step would be lr * m / eps: a parameter's first
        # step takes its first estimate, on the schedule or not
        return p not in self.state or int(self.state[p].get("hessian_step", 0)) == 0

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
