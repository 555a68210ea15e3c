r"""``second.optim.Shampoo``: Kronecker-factored preconditioning of the gradient (Gupta et al. 2018).

For a weight matrix with gradient :math:`G` (layouts as in :mod:`second.optim.soap`) the
factor statistics :math:`L \leftarrow \beta_s L + (1-\beta_s) G G^\top`,
:math:`R \leftarrow \beta_s R + (1-\beta_s) G^\top G` (bias-corrected) are eigendecomposed
every ``precondition_frequency`` steps into an :class:`second.kfac.EigenBlock`, and the
momentum :math:`\hat m` is preconditioned by the damped inverse fourth root of the block:

.. math::

    P = (L \otimes R + \lambda I)^{-1/4}\,\mathrm{vec}(\hat m)
      \;\overset{\lambda = 0}{=}\; L^{-1/4}\,\hat m\,R^{-1/4},\qquad
    \lambda = \text{damping}\cdot\lambda_{\max}(L \otimes R).

With ``graft="adam"`` (default) :math:`P` takes the norm of Adam's direction
:math:`\hat m/(\sqrt{\hat v}+\epsilon)` per parameter (learning-rate grafting, Agarwal et al.
2020), so ``lr`` means what it means for Adam; ``graft=None`` uses :math:`P` as it is.
Parameters without a Kronecker layout (both sides above ``max_precond_dim``) take Adam's
direction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..kfac import EigenBlock
from ._base import check_int, check_nonneg, check_positive, check_unit
from ._preconditioners import KroneckerFactoredOptimizer, check_betas, reject_module

__all__ = ["Shampoo", "shampoo_direction"]

GRAFTS = (None, "adam")


def shampoo_direction(M: Tensor, block: EigenBlock, damping: float = 0.0) -> Tensor:
    r""":math:`(B + \lambda I)^{-1/4} M` for the block :math:`B` (``L`` the ``G`` factor, ``R`` the ``A`` one).

    With ``damping=0`` and a Kronecker block this is :math:`L^{-1/4} M R^{-1/4}`. Zero
    eigenvalues (undamped) give no direction there (a pseudo-inverse root).

    Args:
        M: ``[d_G, d_A]`` (the gradient or its momentum as a matrix).
        block: the factors' eigenbasis.
        damping: the additive :math:`\lambda \ge 0`.

    Returns:
        The preconditioned matrix.

    Example:
        >>> L, R = torch.diag(torch.tensor([16.0, 1.0])), torch.tensor([[81.0]])
        >>> shampoo_direction(torch.ones(2, 1), EigenBlock.from_factors(R, L))
        tensor([[0.1667],
                [0.3333]])
    """
    s = block.damped_eigenvalues(damping)
    root = torch.where(s > 0, s.clamp_min(torch.finfo(s.dtype).tiny).pow(-0.25), 0.0)
    return block.unrotate(block.rotate(M) * root)


class Shampoo(KroneckerFactoredOptimizer):
    r"""Shampoo with Adam grafting and momentum (:mod:`second.optim.shampoo`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate (default ``3e-3``).
        betas: :math:`(\beta_1, \beta_2)`: momentum and the grafted Adam's second moment
            (default ``(0.9, 0.95)``).
        eps: Adam's denominator guard in the grafting (default ``1e-8``).
        weight_decay: decoupled weight decay (default ``0.01``).
        shampoo_beta: decay of the factor statistics (default ``0.95``).
        damping: :math:`\lambda` relative to the block's largest eigenvalue (default ``1e-6``).
        precondition_frequency: steps between eigendecompositions (default ``10``).
        max_precond_dim: the longest side that gets a full factor (default ``2048``).
        graft: ``"adam"`` (default) or ``None``.

    Raises:
        ValueError: a hyperparameter out of range.
        TypeError: a model passed instead of its parameters.

    No closure is needed. Safety: a gradient, factor, eigenbasis or update with NaN or Inf
    entries refuses the whole step: parameters and state are left as they were,
    ``optimizer.counters['n_refused']`` grows and a ``RuntimeWarning`` is given once. Under
    ``torch.distributed`` the factor statistics are averaged over the ranks (the gradients
    are expected averaged, as DDP does) and the eigendecompositions are divided among them.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Linear(3, 2)
        >>> opt = Shampoo(net.parameters(), lr=0.1)
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
        V. Gupta, T. Koren, Y. Singer. Shampoo: Preconditioned stochastic tensor
        optimization. ICML 2018.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        shampoo_beta: float = 0.95,
        damping: float = 1e-6,
        precondition_frequency: int = 10,
        max_precond_dim: int = 2048,
        graft: str | None = "adam",
    ):
        reject_module("Shampoo", params)
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            eps=eps,
            weight_decay=weight_decay,
            shampoo_beta=shampoo_beta,
            damping=damping,
            precondition_frequency=precondition_frequency,
            max_precond_dim=max_precond_dim,
            graft=graft,
        )
        _check(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (its hyperparameters validated like the constructor's)."""
        super().add_param_group(param_group)
        _check(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> Tensor | None:
        """One Shampoo step; ``closure`` (optional) re-evaluates the loss, which is returned."""
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
        phase = self._factor_phase(work, bias_correct=True)
        if phase is None:
            self._refuse("a gradient factor or its eigenbasis has NaN or Inf entries")
            return loss
        entries, new = phase
        updates = []
        for group, p, layout, t in entries:
            st, ns = self.state[p], new[p]
            b1, b2 = group["betas"]
            g = p.grad
            m = torch.lerp(st["exp_avg"], g, 1 - b1) if "exp_avg" in st else g * (1 - b1)
            v = (
                torch.lerp(st["exp_avg_sq"], g * g, 1 - b2)
                if "exp_avg_sq" in st
                else g * g * (1 - b2)
            )
            ns.update(exp_avg=m, exp_avg_sq=v)
            m_hat = m / (1 - b1**t)
            adam = m_hat / ((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
            if layout is None:
                d = adam
            else:
                block = self._block(p, ns)
                top = float(block.eigenvalues.max())
                lam = group["damping"] * top if top > 0 else 1.0
                d = layout.from_matrix(shampoo_direction(layout.to_matrix(m_hat), block, lam), p)
                if group["graft"] == "adam":
                    nd = d.norm()
                    d = d * torch.where(nd > 0, adam.norm() / nd.clamp_min(1e-30), 0.0)
            lr, wd = group["lr"], group["weight_decay"]
            updates.append(-lr * d - (lr * wd) * p if wd else -lr * d)
        if not self._finite(updates, params[0].device):
            self._refuse("the update has NaN or Inf entries")
            return loss
        self._commit([e[1] for e in entries], updates, [new[e[1]] for e in entries])
        return loss


def _check(g: dict) -> None:
    check_positive("lr", g["lr"])
    check_betas(g["betas"])
    check_nonneg("eps", g["eps"])
    check_nonneg("weight_decay", g["weight_decay"])
    check_unit("shampoo_beta", g["shampoo_beta"])
    check_nonneg("damping", g["damping"])
    check_int("precondition_frequency", g["precondition_frequency"])
    check_int("max_precond_dim", g["max_precond_dim"], minimum=0)
    if g["graft"] not in GRAFTS:
        raise ValueError(f"graft must be one of {GRAFTS}, got {g['graft']!r}")
