r"""Curvature columns: square roots of the loss' output curvature, backpropagated to the layers.

KFAC's gradient factor is built from backward passes of columns :math:`s_{ik}` with
:math:`\sum_k s_{ik} s_{ik}^\top \approx \nabla^2_f \ell_i` (``fisher=``):

* ``"type2"``: the exact factorization of :math:`\nabla^2_f\ell_i`, one column per
  output (MSE: :math:`\sqrt{2a}\,I`; BCE-with-logits: :math:`\mathrm{diag}\sqrt{a\,\sigma(1-\sigma)}`;
  cross-entropy: :math:`\sqrt{a}\,(\mathrm{diag}\sqrt{p} - p\sqrt{p}^\top)`, per spatial position);
* ``"mc"``: :math:`s_{ik} = \nabla_f \ell(f_i, \tilde y_{ik}) / \sqrt{a K}` with targets
  sampled from the model (``mc_samples = K``); an example whose output is not finite
  (NaN or infinite logits) has no distribution to sample from: its columns are zero (it
  is skipped, :func:`nonfinite_rows` counts them), and the others are sampled as usual;
* ``"empirical"``: :math:`s_i = \nabla_f \ell(f_i, y_i)` with the observed targets.

Here :math:`a` is the loss' scale relative to a negative log-likelihood (see
:mod:`second._losses`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._losses import (
    check_plain_loss,
    is_weighted,
    label_smoothing,
    linear_loss_note,
    loss_kind,
    nll_scale,
    per_sample_losses,
    sample_targets,
    target_weights,
    weigh_columns,
)

__all__ = [
    "FISHER_TYPES",
    "check_loss",
    "output_hessian_sqrt",
    "output_hessian_product",
    "curvature_columns",
    "backprop_columns",
    "nonfinite_rows",
]

FISHER_TYPES = ("type2", "mc", "empirical")
"""The Fisher estimates KFAC supports (``fisher=``; see the glossary)."""


def check_loss(loss_fn: Callable, fisher: str, *, targets_known: bool = False) -> str | None:
    """Check that KFAC supports ``loss_fn`` with this Fisher type; return its kind.

    Returns:
        ``"mse"``, ``"ce"``, ``"bce"``, or ``None`` for another loss (``"empirical"`` only).

    Raises:
        NotImplementedError: ``fisher="type2"``/``"mc"`` with an unsupported loss, or a
            weighted loss unless ``targets_known`` (the operators see the targets and scale by
            :func:`~second._losses.target_weights`; label smoothing is supported: it leaves the
            output curvature as it is).

    Example:
        >>> check_loss(torch.nn.CrossEntropyLoss(), "type2"), check_loss(torch.nn.L1Loss(), "empirical")
        ('ce', None)
    """
    kind = loss_kind(loss_fn)
    note = linear_loss_note(loss_fn)
    if note is not None and fisher != "empirical":
        raise NotImplementedError(f"KFAC with fisher={fisher!r}: {note}")
    if kind is None and fisher != "empirical":
        raise NotImplementedError(
            f"KFAC with fisher={fisher!r} needs the output curvature of the loss: supported are "
            f"MSELoss, CrossEntropyLoss and BCEWithLogitsLoss, got {type(loss_fn).__name__} "
            "(use fisher='empirical')"
        )
    if kind is not None and not targets_known:
        check_plain_loss(loss_fn)
    return kind


def output_hessian_sqrt(
    loss_fn: Callable, f: Tensor, reduction: str, target: Tensor | None = None
) -> Tensor:
    r"""Columns ``S [K, n, *f.shape[1:]]`` with :math:`\sum_k s_{ik} s_{ik}^\top = \nabla^2_f \ell_i`.

    Exact factorizations of the per-example output Hessian (see the module docstring). With
    the targets, a loss whose curvature depends on them (ignored targets, class weights,
    ``pos_weight``) is scaled by :func:`~second._losses.target_weights`.

    Example:
        >>> S = output_hessian_sqrt(torch.nn.MSELoss(reduction="sum"), torch.zeros(1, 2), "sum")
        >>> (S[:, 0].T @ S[:, 0]).round(decimals=5)   # the Hessian of sum (f - y)^2: 2 I
        tensor([[2., 0.],
                [0., 2.]])
    """
    kind = loss_kind(loss_fn)
    f = f.detach()
    a = nll_scale(loss_fn, f, reduction)
    n = f.shape[0]
    if kind in ("mse", "bce"):
        D = f[0].numel()
        if kind == "mse":
            diag = torch.full_like(f, math.sqrt(2.0 * a)).reshape(n, D)
        else:
            s = torch.sigmoid(f)
            diag = (a * s * (1 - s)).sqrt().reshape(n, D)
        c = target_weights(loss_fn, f, target, reduction)
        if c is not None:
            diag = diag * c.sqrt().reshape(n, D)
        eye = torch.eye(D, dtype=f.dtype, device=f.device)
        S = eye.unsqueeze(1) * diag.unsqueeze(0)  # [D, n, D]
        return S.reshape(D, *f.shape)
    # cross-entropy over dim 1, spatial positions after it
    C = f.shape[1]
    p = torch.softmax(f, dim=1).movedim(1, -1).reshape(n, -1, C)  # [n, P, C]
    P = p.shape[1]
    sq = p.sqrt()
    # column c at position q: sqrt(a) (sqrt(p_c) e_c - p sqrt(p_c)) at q, zero elsewhere
    cols = torch.diag_embed(sq) - p.unsqueeze(-1) * sq.unsqueeze(-2)  # [n, P, C(out), C(col)]
    cols = cols * math.sqrt(a)
    c = target_weights(loss_fn, f, target, reduction)
    if c is not None:
        cols = cols * c.sqrt().reshape(n, P, 1, 1)
    eye = torch.eye(P, dtype=f.dtype, device=f.device)
    S = torch.einsum("iqoc,qr->cqior", cols, eye)  # [C(col), P(col), n, C, P]
    return S.reshape(C * P, *f.shape)


def output_hessian_product(
    loss_fn: Callable, f: Tensor, t: Tensor, reduction: str, target: Tensor | None = None
) -> Tensor:
    r"""Per-example :math:`(\nabla^2_f \ell_i)\, t_i` for ``t`` shaped ``[k, *f.shape]``.

    With the targets, scaled by :func:`~second._losses.target_weights` (as
    :func:`output_hessian_sqrt`).

    Raises:
        NotImplementedError: a loss other than MSE, cross-entropy or BCE-with-logits.

    Example:
        >>> t = torch.ones(1, 1, 2)
        >>> output_hessian_product(torch.nn.MSELoss(reduction="sum"), torch.zeros(1, 2), t, "sum")
        tensor([[[2., 2.]]])
    """
    kind = loss_kind(loss_fn)
    f = f.detach()
    a = nll_scale(loss_fn, f, reduction)
    if kind == "mse":
        return 2.0 * a * t
    c = target_weights(loss_fn, f, target, reduction)
    if kind == "bce":
        s = torch.sigmoid(f)
        out = a * s * (1 - s) * t
        return out if c is None else out * c
    if kind == "ce":
        p = torch.softmax(f, dim=1)
        out = a * (p * t - p * (p * t).sum(dim=2, keepdim=True))
        return out if c is None else out * c.unsqueeze(1)
    raise NotImplementedError(f"no output curvature for {type(loss_fn).__name__}")


def curvature_columns(
    loss_fn: Callable,
    f: Tensor,
    y: Tensor | None,
    reduction: str,
    fisher: str,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The backward columns ``[K, n, ...]`` of the chosen Fisher type (module docstring).

    Args:
        loss_fn: the loss.
        f: the network output ``[n, ...]``.
        y: the targets (used by ``"empirical"`` only).
        reduction: the loss' reduction, ``"mean"`` or ``"sum"``.
        fisher: ``"type2"``, ``"mc"`` or ``"empirical"``.
        mc_samples: sampled targets per example (``"mc"``).
        generator: the generator of the sampled targets (``"mc"``).

    Returns:
        ``S [K, n, *f.shape[1:]]`` with ``K`` columns per example.

    Example:
        >>> f, y = torch.zeros(3, 2), torch.tensor([0, 1, 1])
        >>> curvature_columns(torch.nn.CrossEntropyLoss(), f, y, "mean", "type2").shape
        torch.Size([2, 3, 2])
    """
    if fisher == "type2":
        return output_hessian_sqrt(loss_fn, f, reduction, y)
    if fisher == "empirical" and y is None:
        raise ValueError("fisher='empirical' needs the observed targets y")
    kind = loss_kind(loss_fn)
    ii = getattr(loss_fn, "ignore_index", -100)
    closed = kind is not None and not (kind == "ce" and 0 <= ii < f.shape[1])
    if closed and y is not None and fisher == "empirical" and kind == "ce":
        closed = not bool(torch.as_tensor(y == ii).any())  # ignored targets: the loss handles them
        closed = closed and not label_smoothing(loss_fn)  # smoothed targets: the loss too
    if fisher == "empirical" and is_weighted(loss_fn):
        closed = False  # class weights: the loss' own gradients
    # sampled columns are the likelihood's; the loss' target-dependent weights scale them
    c = target_weights(loss_fn, f, y, reduction) if fisher == "mc" else None
    bad = None
    if fisher == "mc":  # sample from finite logits; skipped rows get zero columns
        bad = nonfinite_rows(f)
        if bad is not None:
            f = torch.where(bad.reshape(-1, *[1] * (f.dim() - 1)), torch.zeros_like(f), f)
    if closed and kind is not None:
        # closed forms of the per-example loss gradients (no autograd pass)
        fd = f.detach()
        a = nll_scale(loss_fn, fd, reduction)
        if y is not None and fisher == "empirical":
            return _loss_gradient(kind, fd, y, a).unsqueeze(0)
        cols = [
            _loss_gradient(kind, fd, sample_targets(loss_fn, fd, generator), a)
            for _ in range(mc_samples)
        ]
        return _zero_rows(weigh_columns(torch.stack(cols), c) / math.sqrt(a * mc_samples), bad)
    fd = f.detach().requires_grad_(True)
    with torch.enable_grad():
        if y is not None and fisher == "empirical":
            (s,) = torch.autograd.grad(per_sample_losses(loss_fn, fd, y, reduction).sum(), fd)
            return s.unsqueeze(0)
        a = nll_scale(loss_fn, fd, reduction)
        cols = []
        for _ in range(mc_samples):
            yt = sample_targets(loss_fn, fd, generator)
            ls = per_sample_losses(loss_fn, fd, yt, reduction, sampled=True)
            (s,) = torch.autograd.grad(ls.sum(), fd)
            cols.append(s)
    return _zero_rows(weigh_columns(torch.stack(cols), c) / math.sqrt(a * mc_samples), bad)


def nonfinite_rows(f: Tensor) -> Tensor | None:
    """The examples (rows of ``f [n, ...]``) with a NaN or infinite entry, or ``None`` if none.

    Example:
        >>> nonfinite_rows(torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]))
        tensor([False,  True])
        >>> nonfinite_rows(torch.zeros(2, 3)) is None
        True
    """
    fd = f.detach()
    bad = ~torch.isfinite(fd.reshape(fd.shape[0], -1)).all(dim=1)
    return bad if bool(bad.any()) else None


def _zero_rows(S: Tensor, bad: Tensor | None) -> Tensor:
    """``S [K, n, ...]`` with the columns of the examples in ``bad`` set to zero."""
    if bad is None:
        return S
    return S.masked_fill(bad.reshape(1, -1, *[1] * (S.dim() - 2)), 0.0)


def _loss_gradient(kind: str, f: Tensor, y: Tensor, a: float) -> Tensor:
    r""":math:`\nabla_f \ell_i(f_i, y_i)` of the per-example losses in closed form."""
    if kind == "mse":
        return 2.0 * a * (f - y)
    if kind == "bce":
        return a * (torch.sigmoid(f) - y)
    p = torch.softmax(f, dim=1)
    if y.is_floating_point():  # class probabilities: the gradient of -sum_k y_k log p_k
        y = y.to(p.dtype)
        return a * (p * y.sum(1, keepdim=True) - y)
    onehot = torch.zeros_like(p).scatter_(1, y.unsqueeze(1), 1.0)
    return a * (p - onehot)


def backprop_columns(
    f: Tensor, S: Tensor, targets: Sequence[Tensor], retain_graph: bool = True
) -> list[Tensor]:
    """``d (S_k . f) / d target`` for every column ``k``: each result ``[K, *target.shape]``.

    Example:
        >>> x = torch.ones(2, requires_grad=True)
        >>> f = 3 * x
        >>> backprop_columns(f, torch.eye(2), [x])[0]
        tensor([[3., 0.],
                [0., 3.]])
    """
    if not targets:
        return []
    K = S.shape[0]
    gs: Sequence[Tensor | None]
    if K == 1:
        g1 = torch.autograd.grad(f, targets, S[0], retain_graph=retain_graph, allow_unused=True)
        gs = [None if g is None else g.unsqueeze(0) for g in g1]
    else:
        gs = torch.autograd.grad(
            f, targets, S, retain_graph=retain_graph, allow_unused=True, is_grads_batched=True
        )
    return [
        torch.zeros((K, *t.shape), dtype=t.dtype, device=t.device) if g is None else g
        for g, t in zip(gs, targets)
    ]
