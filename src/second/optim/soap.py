r"""``second.optim.SOAP``: Adam in the eigenbasis of Shampoo's gradient factors (Vyas et al. 2024).

For a weight matrix with gradient :math:`G_t` (a convolution kernel as ``[out, in k_h k_w]``,
a vector as a column; the larger side is the right one), the factor statistics
:math:`L \leftarrow \beta_s L + (1-\beta_s) G G^\top` and
:math:`R \leftarrow \beta_s R + (1-\beta_s) G^\top G` are running averages and their
eigenbases :math:`Q_L, Q_R` (an :class:`second.kfac.EigenBlock`) are computed on the first
step and refreshed every ``precondition_frequency`` steps by one step of power iteration,
:math:`Q \leftarrow \mathrm{qr}(L Q)` with the columns sorted by their Rayleigh quotients (the
reference implementation's update, which keeps the basis, and so :math:`v`, aligned from one
refresh to the next). In that basis the step is Adam's:

.. math::

    m \leftarrow \beta_1 m + (1-\beta_1) G,\quad
    v \leftarrow \beta_2 v + (1-\beta_2) (Q_L^\top G Q_R)^{\odot 2},\quad
    \theta \leftarrow \theta(1 - \eta\lambda_{wd})
        - \frac{\eta}{1-\beta_1^t}\, Q_L \frac{Q_L^\top m Q_R}{\sqrt{v/(1-\beta_2^t)} + \epsilon} Q_R^\top .

The first moment is kept in the parameter's own coordinates and :math:`v` in the rotated
ones (its rows and columns permuted with the basis' columns at a refresh). A
side longer than ``max_precond_dim`` keeps a diagonal factor (no rotation there); a
parameter with both sides longer gets plain AdamW. With :math:`Q_L = Q_R = I` this is
exactly ``torch.optim.AdamW``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..kfac import EigenBlock
from ._base import check_int, check_nonneg, check_positive, check_unit
from ._preconditioners import KroneckerFactoredOptimizer, MatrixLayout, check_betas, reject_module

__all__ = ["SOAP", "soap_direction"]


def soap_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    block: EigenBlock | None,
    layout: MatrixLayout | None,
    step: int,
    *,
    betas: tuple[float, float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One SOAP direction (the functional kernel; new tensors, nothing written in place).

    Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)` computed in the eigenbasis ``block``
    and rotated back (see :mod:`second.optim.soap`); with ``block=None`` plain Adam's.

    Args:
        grad: the parameter's gradient.
        exp_avg: the first moment (parameter coordinates).
        exp_avg_sq: the second moment (rotated coordinates, ``[d_G, d_A]``; the parameter's
            shape when ``block`` is ``None``).
        block: the eigenbasis, or ``None``.
        layout: the parameter's matrix view (with ``block``).
        step: the step number ``t >= 1`` (bias corrections).
        betas: :math:`(\beta_1, \beta_2)`.
        eps: the denominator guard :math:`\epsilon`.

    Returns:
        ``(direction, exp_avg, exp_avg_sq)``: the step is ``-lr * direction``.

    Example:
        >>> g = torch.tensor([[1.0, -2.0]])
        >>> d, m, v = soap_direction(g, torch.zeros(1, 2), torch.zeros(1, 2), None, None, 1,
        ...                          betas=(0.9, 0.999), eps=0.0)
        >>> d   # Adam's first step: the sign
        tensor([[ 1., -1.]])
    """
    b1, b2 = betas
    m = torch.lerp(exp_avg, grad, 1 - b1)
    if block is None or layout is None:
        gr, mr = grad, m
    else:
        gr, mr = block.rotate(layout.to_matrix(grad)), block.rotate(layout.to_matrix(m))
    v = torch.lerp(exp_avg_sq, gr * gr, 1 - b2)
    denom = (v / (1 - b2**step)).sqrt_().add_(eps)
    nr = mr / denom / (1 - b1**step)
    d = nr if block is None or layout is None else layout.from_matrix(block.unrotate(nr), grad)
    return d, m, v


class SOAP(KroneckerFactoredOptimizer):
    r"""SOAP: Adam in the eigenbasis of Shampoo's factors (:mod:`second.optim.soap`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (default ``1e-2``, chosen on the zoo of
            ``benchmarks/bench_zoo.py``; the paper's ``3e-3`` trains the digits models
            several times slower).
        betas: Adam's :math:`(\beta_1, \beta_2)` (default ``(0.95, 0.95)``, the paper's).
        eps: Adam's denominator guard (default ``1e-8``).
        weight_decay: decoupled weight decay (default ``0.01``).
        shampoo_beta: decay of the factor statistics (default ``0.95``).
        precondition_frequency: steps between eigenbasis refreshes (default ``10``).
        max_precond_dim: the longest side that gets a full factor (default ``2048``).

    Raises:
        ValueError: a hyperparameter out of range.
        TypeError: a model passed instead of its parameters.

    No closure is needed; ``step(closure)`` calls it (torch.optim's contract) and returns
    its loss. A non-finite gradient, factor or eigenbasis refuses the step (see
    :class:`~second.optim.Shampoo`); ``optimizer.counters['n_refused']`` counts them. Under
    ``torch.distributed`` the factor statistics are averaged over the ranks and each
    eigendecomposition runs on one rank and is shared.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = SOAP(net.parameters(), lr=0.1)
        >>> X, y = torch.randn(16, 3), torch.randn(16, 2)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(net(X), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure).item()
        >>> for _ in range(30):
        ...     last = opt.step(closure).item()
        >>> last < first
        True

    References:
        N. Vyas et al. SOAP: Improving and stabilizing Shampoo using Adam. arXiv 2409.11321, 2024.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.95, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        shampoo_beta: float = 0.95,
        precondition_frequency: int = 10,
        max_precond_dim: int = 2048,
    ):
        reject_module("SOAP", params)
        _check(lr, betas, eps, weight_decay, shampoo_beta, precondition_frequency, max_precond_dim)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            shampoo_beta=shampoo_beta,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (its hyperparameters validated like the constructor's)."""
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        _check(
            g["lr"], g["betas"], g["eps"], g["weight_decay"], g["shampoo_beta"],
            g["precondition_frequency"], g["max_precond_dim"],
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Tensor | None:
        """One SOAP step; ``closure`` (optional) re-evaluates the loss, which is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._with_grads()
        if not work:
            return loss
        params = [p for _, ps in work for p in ps]
        self._check_sparse(params)
        if not self._finite([p.grad for p in params], params[0].device):
            self._refuse("a gradient has NaN or Inf entries")
            return loss
        phase = self._factor_phase(work, bias_correct=False, refresh="power")
        if phase is None:
            self._refuse("a gradient factor or its eigenbasis has NaN or Inf entries")
            return loss
        entries, new = phase
        updates = []
        for group, p, layout, t in entries:
            st, ns = self.state[p], new[p]
            block = self._block(p, ns) if layout is not None else None
            if "exp_avg" not in st:
                shape = (layout.d_G, layout.d_A) if layout is not None else p.shape
                st_m, st_v = torch.zeros_like(p), p.new_zeros(shape)
            else:
                st_m, st_v = st["exp_avg"], st["exp_avg_sq"]
                perm_G, perm_A = ns.pop("perm_G", None), ns.pop("perm_A", None)
                if perm_G is not None:  # the basis was refreshed: v follows its column order
                    st_v = st_v[perm_G]
                if perm_A is not None:
                    st_v = st_v[:, perm_A]
            d, m, v = soap_direction(
                p.grad, st_m, st_v, block, layout, t, betas=group["betas"], eps=group["eps"]
            )
            ns.update(exp_avg=m, exp_avg_sq=v)
            lr, wd = group["lr"], group["weight_decay"]
            updates.append(-lr * d - (lr * wd) * p if wd else -lr * d)
        if not self._finite(updates, params[0].device):
            self._refuse("the update has NaN or Inf entries")
            return loss
        self._commit([e[1] for e in entries], updates, [new[e[1]] for e in entries])
        return loss


def _check(lr, betas, eps, weight_decay, shampoo_beta, frequency, max_dim) -> None:
    check_positive("lr", lr)
    check_betas(betas)
    check_nonneg("eps", eps)
    check_nonneg("weight_decay", weight_decay)
    check_unit("shampoo_beta", shampoo_beta)
    check_int("precondition_frequency", frequency)
    check_int("max_precond_dim", max_dim, minimum=0)
