r"""Jacobian-vector products for KFAC's quadratic model, on the captured training batch.

The optimizer picks its step size and momentum from the exact mini-batch GGN,
:math:`v_a^\top J^\top H J v_b`, which needs :math:`J v` for two vectors. For a plain
``nn.Sequential`` MLP (:func:`mlp_chain`) the tangents are pushed through the activations
the training forward already computed (:func:`chain_jvp`); any other model runs
forward-mode AD on the captured batch (:func:`second.func.forward.module_jvp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as dist
from ..func.forward import RandomState
from ..kfac import LayerRule, LinearRule, output_hessian_product

_ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Identity, nn.GELU, nn.SiLU, nn.LeakyReLU)
MAX_MOMENTUM = 0.95
"""Upper bound of the momentum the quadratic model may choose."""


def mlp_chain(model: nn.Module, layers: Sequence[LayerRule]) -> list[tuple[str, Any]] | None:
    """``[("linear", j) | ("act", module), ...]`` for a plain Sequential MLP, else ``None``.

    Plain: an ``nn.Sequential`` (its own forward) of the KFAC linear layers, each used
    once, Tanh/Sigmoid/ReLU/Identity/GELU (exact)/SiLU/LeakyReLU activations and
    ``nn.Dropout`` (``("dropout", module)``: its masks are recorded by the optimizer's
    hooks, :func:`dropout_mask`); no in-place module but ReLU, no buffers, no other
    parameters.
    """
    if type(model).forward is not nn.Sequential.forward or not isinstance(model, nn.Sequential):
        return None
    if next(model.buffers(), None) is not None:
        return None
    which = {id(layer.module): j for j, layer in enumerate(layers) if isinstance(layer, LinearRule)}
    chain: list[tuple[str, Any]] = []
    seen: set[int] = set()
    for m in model:
        if getattr(m, "inplace", False) and type(m) is not nn.ReLU:
            # it overwrites a captured activation that the tangents read (ReLU's derivative is
            # read off its output, which it leaves right)
            return None
        j = which.get(id(m))
        if j is not None:
            if j in seen:
                return None
            seen.add(j)
            chain.append(("linear", j))
        elif type(m) in _ACTIVATIONS and getattr(m, "approximate", "none") == "none":
            chain.append(("act", m))
        elif type(m) is nn.Dropout:
            chain.append(("dropout", m))
        else:
            return None
    if len(seen) != len(layers):
        return None
    return chain


def dropout_mask(module: nn.Dropout, rng: RandomState, x: Tensor) -> Tensor | None:
    """The multiplier (mask over ``1 - p``) a dropout drew on ``x``; ``None`` if it drew none.

    Re-draws it on a tensor of ones of ``x``'s shape, dtype and device from the generators'
    state ``rng`` recorded just before the dropout ran: the same draws, so the same mask.
    """
    if not module.training or module.p == 0.0:
        return None
    with rng.replay():
        return F.dropout(torch.ones_like(x), module.p, True)


def chain_jvp(
    chain: list,
    layers: Sequence[LayerRule],
    index: dict[int, int],
    fwd: tuple,
    tangents: list[Tensor],
    masks: dict[int, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Output and ``J v`` of a plain MLP from the captured forward: only tangents are computed.

    The primal activations of the training forward (same batch, same parameters) are
    reused; each linear layer costs two matrix products per vector, each activation
    one elementwise product with its derivative (read off its output, or for GELU, SiLU
    and LeakyReLU off its input).

    Args:
        chain: from :func:`mlp_chain`.
        layers: the KFAC layer rules.
        index: ``id(parameter) -> position`` in ``tangents``.
        fwd: ``(x, layer inputs, layer outputs, output)`` of the training forward.
        tangents: per parameter ``[k, *p.shape]``.
        masks: per chain position of a dropout, the multiplier it drew in that forward
            (``None``: it drew none); required when the chain has a dropout.
    """
    x, inputs, outputs, out = fwd
    k, n = tangents[0].shape[0], x.shape[0]
    # tangents laid out [n, k, d] (all k at once in each matrix product)
    cur, t = x, None  # primal [n, d] and tangent [n, k, d] at the current point
    for pos, (kind, obj) in enumerate(chain):
        if kind == "linear":
            layer = layers[obj]
            d_out = layer.d_G
            dW = tangents[index[id(layer.weight)]].reshape(k * d_out, -1)  # [k*out, in]
            a = inputs[obj]
            if layer.has_bias:
                db = tangents[index[id(layer.bias)]].reshape(-1)
                z = torch.addmm(db, a, dW.T)  # [n, k*out]
            else:
                z = a @ dW.T
            if t is not None:
                z.view(n * k, d_out).addmm_(t.reshape(n * k, -1), layer.weight.detach().T)
            t, cur = z.view(n, k, d_out), outputs[obj]
            continue
        if kind == "dropout":
            assert masks is not None  # the optimizer records them with the forward
            mask = masks[pos]
            if mask is not None:
                cur = cur * mask
                t = None if t is None else t * mask.to(t.dtype).unsqueeze(1)
            continue
        # elementwise activation: its output is the next layer's input or the model's
        nxt = chain[pos + 1] if pos + 1 < len(chain) else None
        if nxt is None:
            y = out
        elif nxt[0] == "linear":
            y = inputs[nxt[1]]
        else:
            y = obj(cur)
        if t is not None:
            if isinstance(obj, nn.Tanh):
                t = t * (1.0 - y * y).unsqueeze(1)
            elif isinstance(obj, nn.Sigmoid):
                t = t * (y * (1.0 - y)).unsqueeze(1)
            elif isinstance(obj, nn.ReLU):
                t = t * (y > 0).to(t.dtype).unsqueeze(1)
            elif not isinstance(obj, nn.Identity):  # GELU, SiLU, LeakyReLU: from the input
                t = t * _derivative(obj, cur).unsqueeze(1)
        cur = y
    if t is None:
        return out, out.new_zeros((k, *out.shape))
    return out, t.transpose(0, 1)


def _derivative(act: nn.Module, x: Tensor) -> Tensor:
    """The derivative of an elementwise GELU (exact), SiLU or LeakyReLU at its input ``x``."""
    if isinstance(act, nn.GELU):
        return 0.5 * (1.0 + torch.erf(x * _SQRT_HALF)) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    if isinstance(act, nn.SiLU):
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    assert isinstance(act, nn.LeakyReLU)
    slope = act.negative_slope
    return (x > 0).to(x.dtype) * (1.0 - slope) + slope


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def ggn_gram(
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    reduction: str,
    out: Tensor,
    Jv: Tensor,
    distributed: bool,
    target: Tensor | None = None,
) -> Tensor:
    r"""The matrix :math:`[v_a^\top J^\top H J v_b]` of the batch GGN from ``Jv [k, *out.shape]``.

    Args:
        loss_fn: the loss (its output Hessian :math:`H`).
        reduction: ``"mean"`` divides by the number of examples (over all ranks).
        out: the network output (as the loss sees it).
        Jv: the Jacobian-vector products.
        distributed: sum the terms and counts over the process group.
        target: the targets, where they weigh the positions (ignored ones).
    """
    k = Jv.shape[0]
    HJv = output_hessian_product(loss_fn, out, Jv, reduction, target)
    Q = Jv.reshape(k, -1) @ HJv.reshape(k, -1).T
    Q = 0.5 * (Q + Q.T)
    n = float(out.shape[0])
    if distributed:
        buf = torch.cat([Q.reshape(-1), Q.new_tensor([n])])
        dist.all_reduce_sum(buf)
        Q, n = buf[:-1].reshape(k, k), float(buf[-1])
    return Q / n if reduction == "mean" else Q


def step_coefficients(
    Fq: list[list[float]],
    nrm: list[list[float]],
    gV: list[float],
    damping: float,
    weight_decay: float,
    momentum: float | None,
    max_momentum: float = MAX_MOMENTUM,
) -> tuple[float, float, float]:
    r"""Learning rate and momentum from the quadratic model (Martens & Grosse, section 7).

    With :math:`V = [\Delta, \delta_0]` (or :math:`[\Delta]` before the first update),
    :math:`(\alpha, \mu)` minimize :math:`\tfrac12 c^\top (F_V + (\lambda+\eta) N_V) c + g_V^\top c`
    over :math:`\mu \in [0, \mu_{max}]` (a 2x2 solve; when its :math:`\mu` falls outside,
    the minimizer lies on the nearer bound, where only :math:`\alpha` is solved for; with a
    fixed ``momentum`` only :math:`\alpha`). A singular system gives NaN. On noisy
    mini-batches the unconstrained :math:`\mu` is often slightly negative or above 1 (the
    digits MLPs: about half of the steps), which a momentum method must not take.

    Args:
        Fq: :math:`[v_a^\top F v_b]`.
        nrm: :math:`[v_a^\top v_b]`.
        gV: :math:`[g^\top v_a]`.
        damping: :math:`\lambda`.
        weight_decay: :math:`\eta`.
        momentum: a fixed :math:`\mu`, or ``None`` to solve for it.
        max_momentum: :math:`\mu_{max}`, the upper bound of a solved :math:`\mu`.

    Returns:
        ``(alpha, mu, predicted change)``, the change of the undamped model
        :math:`\tfrac12 c^\top (F_V + \eta N_V) c + g_V^\top c`.
    """
    k = len(gV)
    have_prev = k == 2
    lam, eta = damping, weight_decay
    Qd = [[Fq[a][b] + (lam + eta) * nrm[a][b] for b in range(k)] for a in range(k)]
    if have_prev and momentum is None:
        # the 2x2 system Qd (alpha, mu) = -gV
        det = Qd[0][0] * Qd[1][1] - Qd[0][1] * Qd[1][0]
        if det != 0.0:
            alpha = -(Qd[1][1] * gV[0] - Qd[0][1] * gV[1]) / det
            mu = -(Qd[0][0] * gV[1] - Qd[1][0] * gV[0]) / det
        else:
            alpha = mu = math.nan
        if math.isfinite(mu) and not 0.0 <= mu <= max_momentum:
            # a convex model: the constrained minimizer is on the bound nearer to mu
            momentum = min(max(mu, 0.0), max_momentum)
    if not (have_prev and momentum is None):
        mu = 0.0 if (momentum is None or not have_prev) else float(momentum)
        num = -(gV[0] + (mu * Qd[0][1] if have_prev else 0.0))
        alpha = num / Qd[0][0] if Qd[0][0] != 0.0 else math.nan
    c = [alpha, mu] if have_prev else [alpha]
    pred = sum(  # undamped model change
        0.5 * c[a] * (Fq[a][b] + eta * nrm[a][b]) * c[b] for a in range(k) for b in range(k)
    ) + sum(c[a] * gV[a] for a in range(k))
    return alpha, mu, pred
