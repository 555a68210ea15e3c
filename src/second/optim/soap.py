r"""``second.optim.SOAP``: Adam in the eigenbasis of Shampoo's gradient factors (Vyas et al. 2024).

For a weight matrix with gradient :math:`G_t` (a convolution kernel as ``[out, in k_h k_w]``;
the larger side is the right one; a vector, such as a bias, as a column, or with
``precondition_1d=False`` with AdamW's step), the factor statistics
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

Both moments are held in the rotated coordinates: :math:`v` has its rows and columns
permuted with the basis' columns at a refresh, and :math:`m` (the same running average of
the rotated gradients as the rotation of the average above) is moved exactly to the new
basis there, :math:`m \leftarrow Q_L'^\top Q_L m Q_R^\top Q_R'`, as the reference
implementation does; that saves one rotation per step. A
side longer than ``max_precond_dim`` keeps a diagonal factor (no rotation there); a
parameter with both sides longer gets plain AdamW. With :math:`Q_L = Q_R = I` this is
exactly ``torch.optim.AdamW``.

Two differences from the reference code of Vyas et al.: at a refresh the basis is updated
with the factors that include the current gradient *before* that gradient is rotated (the
reference rotates it with the old basis, then refreshes), and the first step is taken (the
reference only accumulates the factors on it). That first step runs in the eigenbasis of
:math:`G_1` itself, where the rotated gradient is diagonal up to rounding, so its
off-diagonal entries (about ``1e-16`` relative) get Adam ratios of about
``1e-16 / (1e-16 + eps)``: two implementations of this rule agree there only to about the
rounding over ``eps``, not to machine precision. Parameters in ``bfloat16`` work: the
eigendecompositions and QR factorizations run in float32.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from .._compile import eager_under_compile
from ..kfac import EigenBlock
from ._gradient_factors import KroneckerFactoredOptimizer, MatrixLayout
from ._preconditioned import hyperparameters

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
    rotated_exp_avg: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One SOAP direction (the functional kernel; new tensors, nothing written in place).

    Adam's :math:`\hat m / (\sqrt{\hat v} + \epsilon)` computed in the eigenbasis ``block``
    and rotated back (see :mod:`second.optim.soap`); with ``block=None`` plain Adam's.

    Args:
        grad: the parameter's gradient.
        exp_avg: the first moment (parameter coordinates; with ``rotated_exp_avg`` and a
            ``block``, rotated ones, ``[d_G, d_A]``).
        exp_avg_sq: the second moment (rotated coordinates, ``[d_G, d_A]``; the parameter's
            shape when ``block`` is ``None``).
        block: the eigenbasis, or ``None``.
        layout: the parameter's matrix view (with ``block``).
        step: the step number ``t >= 1`` (bias corrections).
        betas: :math:`(\beta_1, \beta_2)`.
        eps: the denominator guard :math:`\epsilon`.
        rotated_exp_avg: ``exp_avg`` is held in the eigenbasis (and returned there): one
            rotation per step fewer; the holder moves it at a refresh of the basis
            (:meth:`SOAP` does).

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
    if block is None or layout is None:
        gr = grad
        m = mr = torch.lerp(exp_avg, grad, 1 - b1)
    elif rotated_exp_avg:
        gr = block.rotate(layout.to_matrix(grad))
        m = mr = torch.lerp(exp_avg, gr, 1 - b1)
    else:
        gr = block.rotate(layout.to_matrix(grad))
        m = torch.lerp(exp_avg, grad, 1 - b1)
        mr = block.rotate(layout.to_matrix(m))
    v = torch.lerp(exp_avg_sq, gr * gr, 1 - b2)
    denom = (v / (1 - b2**step)).sqrt_().add_(eps)
    nr = mr / denom / (1 - b1**step)
    d = nr if block is None or layout is None else layout.from_matrix(block.unrotate(nr), grad)
    return d, m, v


_MOMENT_KEY = "first_moment"  # state_dict(): where exp_avg is held (absent: parameter coordinates)


class SOAP(KroneckerFactoredOptimizer):
    r"""SOAP: Adam in the eigenbasis of Shampoo's factors (:mod:`second.optim.soap`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\eta` (default ``1e-2``, chosen on the zoo of
            ``benchmarks/bench_zoo.py``; the paper's ``3e-3`` trains the digits models
            several times slower).
        betas: Adam's :math:`(\beta_1, \beta_2)` (default ``(0.9, 0.999)``, Adam's, chosen on
            the zoo: the paper's ``(0.95, 0.95)``, tuned for large-batch language models, trains
            every zoo model worse, the character transformer 2-3% worse at equal steps).
        eps: Adam's denominator guard (default ``1e-8``).
        weight_decay: decoupled weight decay (default ``0.01``).
        shampoo_beta: decay of the factor statistics (default ``0.95``).
        precondition_frequency: steps between eigenbasis refreshes (default ``10``).
        max_precond_dim: the longest side that gets a full factor (default ``2048``).
        precondition_1d: give vectors (biases, norm scales) a full factor, as the matrix
            ``[n, 1]`` (default ``True``); ``False`` gives them AdamW's step, as the reference
            implementation does (on the zoo's character transformer, 20 of its 30 tensors:
            2% cheaper steps, 0.8% worse validation loss at equal CPU time, seeds 0-2).

    Raises:
        ValueError: a hyperparameter out of range.
        TypeError: a model passed instead of its parameters.

    No closure is needed; ``step(closure)`` calls it (torch.optim's contract) and returns
    its loss. A non-finite gradient, factor or eigenbasis refuses the step (see
    :class:`~second.optim.Shampoo`); ``optimizer.counters['n_refused']`` counts them. Under
    ``torch.distributed`` the factor statistics are averaged over the ranks and each
    eigendecomposition runs on one rank and is shared.

    Example:
        With no room for a factor (``max_precond_dim=0``) SOAP is AdamW, whose first step
        moves every coordinate by ``lr``:

        >>> w = torch.nn.Parameter(torch.zeros(2, 3))
        >>> opt = SOAP([w], lr=0.1, weight_decay=0.0, max_precond_dim=0)
        >>> w.grad = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
        >>> opt.step()
        >>> w.detach()
        tensor([[-0.1000,  0.1000, -0.1000],
                [ 0.1000, -0.1000,  0.1000]])

    References:
        N. Vyas et al. SOAP: Improving and stabilizing Shampoo using Adam. arXiv 2409.11321, 2024.
    """

    _bias_correct = False
    _refresh = "power"

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        shampoo_beta: float = 0.95,
        precondition_frequency: int = 10,
        max_precond_dim: int = 2048,
        precondition_1d: bool = True,
    ):
        defaults = hyperparameters(locals())
        super().__init__(params, defaults)

    def _check_group(self, g: dict) -> None:
        super()._check_group(g)

    # torch.compile(opt.step) runs this step eagerly: compiled (torch 2.13, CPU), it took other
    # steps than eager from the first step after an eigenbasis refresh on (5e-4 after one step
    # in float64), and on CPU compilation does not pay (BENCHMARKS.md)
    @eager_under_compile
    def step(self, closure=None):  # type: ignore[override]  # the loss is returned as a tensor
        """One step; ``closure`` (optional) re-evaluates the loss, which is returned."""
        return super().step(closure)

    def state_dict(self) -> dict:
        """The optimizer's state, marked with where ``exp_avg`` is held (the eigenbasis).

        The mark is in every parameter group, where checkpoint tools that keep only
        ``"state"`` and ``"param_groups"`` (``torch.distributed.checkpoint``) keep it, and at
        the top level, where the previous release read it.
        """
        sd = super().state_dict()
        sd[_MOMENT_KEY] = "eigenbasis"
        for group in sd["param_groups"]:  # fresh dicts (torch.optim packs them per call)
            group[_MOMENT_KEY] = "eigenbasis"
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by :meth:`state_dict`.

        A state saved by a version that held the first moment in the parameter's coordinates
        (no ``"first_moment"`` mark, neither in its parameter groups nor at the top level) has
        it moved into the eigenbasis.

        Raises:
            ValueError: if it was saved for another number or shapes of parameters.
        """
        state_dict = dict(state_dict)
        everywhere = state_dict.pop(_MOMENT_KEY, None) == "eigenbasis"
        marked = [g.get(_MOMENT_KEY) == "eigenbasis" for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        for group, rotated in zip(self.param_groups, marked):
            group.pop(_MOMENT_KEY, None)  # a mark of the saved state, not a hyperparameter
            if everywhere or rotated:
                continue
            for p in group["params"]:
                st = self.state[p]
                if "exp_avg" not in st or "QG" not in st:
                    continue
                layout = self._layout(group, p)
                if layout is not None:
                    st["exp_avg"] = self._block(p, {}).rotate(layout.to_matrix(st["exp_avg"]))

    def _direction(self, group: dict, p: Tensor, layout, t: int, ns: dict) -> Tensor:
        st = self.state[p]
        block = self._block(p, ns) if layout is not None else None
        if "exp_avg" not in st:
            shape = (layout.d_G, layout.d_A) if layout is not None else p.shape
            st_m, st_v = p.new_zeros(shape), p.new_zeros(shape)
        else:
            st_m, st_v = st["exp_avg"], st["exp_avg_sq"]
            perm_G, perm_A = ns.pop("perm_G", None), ns.pop("perm_A", None)
            if perm_G is not None:  # the basis was refreshed: v follows its column order
                st_v = st_v[perm_G]
            if perm_A is not None:
                st_v = st_v[:, perm_A]
            if block is not None and "QG" in ns:  # refreshed: m moves to the new basis
                st_m = block.rotate(self._block(p, {}).unrotate(st_m))  # from the stored basis
        assert p.grad is not None  # only parameters with a gradient are stepped (_with_grads)
        d, m, v = soap_direction(
            p.grad, st_m, st_v, block, layout, t, betas=group["betas"], eps=group["eps"],
            rotated_exp_avg=True,
        )  # fmt: skip
        ns.update(exp_avg=m, exp_avg_sq=v)
        return d
