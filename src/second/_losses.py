r"""What the library needs to know about a loss function.

The curvature of a dataset objective depends on how the loss reduces over the
batch. We write a batch loss as :math:`L_b = w_b \sum_{i \in b} \ell_i` with the
per-example loss :math:`\ell_i` defined as the loss of a batch of one, so that
``reduction="mean"`` gives :math:`w_b = 1/n_b` and ``"sum"`` gives :math:`w_b = 1`.
For ``nn.MSELoss(reduction="mean")`` on ``C`` outputs, :math:`\ell_i` is therefore the
mean over the ``C`` outputs of example ``i``.

For the Monte-Carlo Fisher we also need the likelihood the loss is a scaled negative
log-likelihood of: :math:`\ell = a \cdot \mathrm{NLL}` with

* MSE: Gaussian with variance 1/2 per output (``NLL = ||f - y||^2``), ``a = 1/C`` for mean reduction;
* cross-entropy: categorical over dimension 1, ``a = 1`` (``1/d`` with ``d`` extra spatial positions);
* BCE-with-logits: independent Bernoulli, ``a = 1/C`` for mean reduction.

Then :math:`\mathbb{E}_{\tilde y}[\nabla_f \ell\, \nabla_f \ell^\top] / a = \nabla^2_f \ell`, so the
MC Fisher is an unbiased estimate of the GGN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "loss_kind",
    "reduction_of",
    "per_sample_losses",
    "sample_targets",
    "nll_scale",
    "label_smoothing",
    "linear_loss_note",
    "target_weights",
    "is_weighted",
    "needs_targets",
    "weigh_columns",
]

# class-probability targets whose rows sum to 1 within this are taken as summing to 1 (a
# float32 softmax over many classes is off by ~1e-6): no per-position curvature weight
SOFT_TARGET_SUM_TOL = 1e-5


def loss_kind(loss_fn: Callable) -> str | None:
    """``"mse"``, ``"ce"``, ``"bce"`` for the supported ``torch.nn`` losses, else ``None``."""
    if isinstance(loss_fn, nn.MSELoss):
        return "mse"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return "ce"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return "bce"
    return None


def reduction_of(loss_fn: Callable, reduction: str | None = None) -> str:
    """The batch reduction: the explicit argument, else ``loss_fn.reduction``, else ``"mean"``."""
    red = reduction if reduction is not None else getattr(loss_fn, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError(
            f"the loss must reduce to a scalar with reduction 'mean' or 'sum', got {red!r}"
        )
    return red


def is_weighted(loss_fn: Callable) -> bool:
    """Whether the loss weighs its terms by class (``weight=``) or positives (``pos_weight=``)."""
    return (
        getattr(loss_fn, "weight", None) is not None
        or getattr(loss_fn, "pos_weight", None) is not None
    )


def check_plain_loss(loss_fn: Callable) -> None:
    r"""Refuse a weighted loss where the targets are not known (the optimizers' statistics).

    A weighted loss' output curvature depends on each example's target (its class weight);
    the operators, which see the targets, scale by :func:`target_weights`. Label smoothing is
    fine everywhere: cross-entropy against smoothed targets :math:`q` has the output Hessian
    :math:`(\sum_c q_c)(\mathrm{diag}\,p - pp^\top) = \mathrm{diag}\,p - pp^\top`, that of
    the plain loss, and the Monte-Carlo Fisher samples hard labels from :math:`p`.
    """
    if is_weighted(loss_fn):
        raise NotImplementedError(
            "weighted losses (weight=/pos_weight=) are not supported here: their output "
            "curvature depends on each example's target (its class weight), which the "
            "optimizer's statistics do not see; the curvature operators (KFACOperator, "
            "FisherOperator, GGNOperator, ...) do support them"
        )


def target_weights(
    loss_fn: Callable, output: Tensor, target: Tensor | None, reduction: str
) -> Tensor | None:
    r"""Per-position weights :math:`c` of the output curvature that depend on the targets.

    The curvature routines write a batch loss as :math:`w_b \sum_i \ell_i` with the plain
    per-example loss (module docstring). A loss whose terms depend on the targets differs from
    that by a weight per position (cross-entropy: per example and spatial position; BCE: per
    element): its output Hessian is :math:`c` times the plain one. For cross-entropy, ignored
    targets (``ignore_index``) weigh 0, class weights weigh :math:`w_y` (with label smoothing
    :math:`(1-\varepsilon) w_y + \varepsilon \bar w`), and ``reduction="mean"`` divides by the
    sum of the weights of the valid targets, as torch does, instead of the number of
    positions. Class probabilities :math:`p` weigh :math:`\sum_k w_k p_k` (1 when they sum
    to 1 without class weights). For BCE-with-logits, :math:`c = \mathrm{weight}\,(p_w y + 1 - y)`.

    Returns:
        ``c`` shaped ``[n, *positions]`` (cross-entropy) or like ``output`` (BCE), or ``None``
        when every weight is 1 (or the targets are not given).

    Example:
        >>> f, y = torch.zeros(3, 2), torch.tensor([0, -100, 1])
        >>> target_weights(torch.nn.CrossEntropyLoss(), f, y, "mean")   # 3 examples, 2 valid
        tensor([1.5000, 0.0000, 1.5000])
    """
    kind = loss_kind(loss_fn)
    if target is None or kind not in ("ce", "bce"):
        return None
    w = getattr(loss_fn, "weight", None)
    if kind == "bce":
        pw = getattr(loss_fn, "pos_weight", None)
        if w is None and pw is None:
            return None
        y = target.to(output.dtype)
        c = torch.ones_like(output) if pw is None else pw.to(output) * y + 1 - y
        return c if w is None else c * w.to(output)
    if target.is_floating_point():
        # class probabilities p: the Hessian is sum_k w_k p_k times the plain one (p after
        # label smoothing); torch's mean divides by the number of positions
        shape = [1, -1] + [1] * (output.dim() - 2)
        p = target.to(output.dtype)
        c = (p if w is None else p * w.to(output).reshape(shape)).sum(1)
        eps = label_smoothing(loss_fn)
        if eps:
            c = (1 - eps) * c + eps * (1.0 if w is None else float(w.to(output).mean()))
        if w is None and bool(((c - 1).abs() <= SOFT_TARGET_SUM_TOL).all()):
            return None
        return c
    weights = class_target_weights(loss_fn, target, output)
    if weights is None:
        return None
    raw, norm = weights
    if reduction == "sum":
        return raw
    return raw * _mean_rescale(norm)


def class_target_weights(
    loss_fn: Callable, target: Tensor, like: Tensor
) -> tuple[Tensor, Tensor] | None:
    """Per position, the Hessian's weight and torch's mean weight of class targets.

    Both are ``w_y`` (0 where the target is ignored; the first with label smoothing), or
    ``None`` when both are 1 everywhere.
    """
    w = getattr(loss_fn, "weight", None)
    valid = target != getattr(loss_fn, "ignore_index", -100)
    if w is None and bool(valid.all()):
        return None
    if w is None:
        ones = valid.to(like.dtype)
        return ones, ones
    wy = w.to(like)[torch.where(valid, target, 0)] * valid  # ignore_index may be >= C
    eps = label_smoothing(loss_fn)
    return ((1 - eps) * wy + eps * w.to(like).mean() * valid if eps else wy), wy


def _mean_rescale(norm: Tensor) -> Tensor | float:
    """From a mean over positions to torch's mean over the weights ``norm`` of the targets."""
    total = norm.sum()
    return norm.numel() / total if bool(total > 0) else 0.0


def needs_targets(loss_fn: Callable) -> bool:
    """Whether the loss' output curvature can depend on the targets (:func:`target_weights`)."""
    return loss_kind(loss_fn) in ("ce", "bce")


def weigh_columns(S: Tensor, c: Tensor | None) -> Tensor:
    """Columns ``S [K, n, ...]`` of the output curvature scaled by ``sqrt(c)``.

    ``c`` from :func:`target_weights`: one weight per example and position (cross-entropy,
    broadcast over the classes) or per element (BCE); ``None`` leaves ``S`` as it is.
    """
    if c is None:
        return S
    r = c.sqrt()
    if r.dim() < S.dim() - 1:  # cross-entropy: no class dimension
        r = r.unsqueeze(1)
    return S * r


def linear_loss_note(loss_fn: Callable) -> str | None:
    """Why a loss linear in the network output has no Gauss-Newton curvature, else ``None``."""
    if isinstance(loss_fn, nn.NLLLoss):
        return (
            "NLLLoss is linear in the model's output (log-probabilities), so its Gauss-Newton "
            "matrix is zero: use nn.CrossEntropyLoss on the logits (the same objective when "
            "the model ends in log_softmax), whose GGN is the Fisher"
        )
    if isinstance(loss_fn, nn.L1Loss):
        return (
            "L1Loss is piecewise linear in the model's output, so its Gauss-Newton matrix is "
            "zero almost everywhere: use the Hessian, the empirical Fisher or a smooth loss "
            "(nn.HuberLoss, nn.MSELoss)"
        )
    return None


def label_smoothing(loss_fn: Callable) -> float:
    """The loss' label smoothing (0 for none or another loss)."""
    return float(getattr(loss_fn, "label_smoothing", 0.0) or 0.0)


def per_sample_losses(
    loss_fn: Callable, output: Tensor, target: Tensor, reduction: str, *, sampled: bool = False
) -> Tensor:
    r"""The vector :math:`(\ell_i)` of per-example losses (see the module docstring).

    ``sampled=True``: the targets were drawn from the model (the Monte-Carlo Fisher), so the
    loss is the likelihood's, without label smoothing.
    """
    kind = loss_kind(loss_fn)
    n = output.shape[0]
    if kind is not None:
        if kind == "mse":
            el = nn.functional.mse_loss(output, target, reduction="none")
        elif kind == "bce":
            w, pw = (
                (None, None)
                if sampled
                else (getattr(loss_fn, "weight", None), getattr(loss_fn, "pos_weight", None))
            )
            el = nn.functional.binary_cross_entropy_with_logits(
                output, target, weight=w, pos_weight=pw, reduction="none"
            )
        else:
            # a sampled target is a class the model drew, never a position to ignore (that
            # weight comes from the observed target): with ignore_index a real class (0 for a
            # padding class, say) every draw of it scored 0 and the Monte-Carlo Fisher lost
            # that class's term
            ii = -100 if sampled else getattr(loss_fn, "ignore_index", -100)
            ls = 0.0 if sampled else label_smoothing(loss_fn)
            w = None if sampled else getattr(loss_fn, "weight", None)
            el = nn.functional.cross_entropy(
                output, target, weight=w, reduction="none", ignore_index=ii, label_smoothing=ls
            )
            if not sampled and reduction == "mean" and not target.is_floating_point():
                # torch's mean divides by the weights of the valid targets, not the positions
                weights = class_target_weights(loss_fn, target, el)
                if weights is not None:
                    el = el * _mean_rescale(weights[1])
        el = el.reshape(n, -1)
        return el.mean(1) if reduction == "mean" else el.sum(1)

    def one(o, t):
        return loss_fn(o.unsqueeze(0), t.unsqueeze(0))

    return torch.func.vmap(one)(output, target)


def nll_scale(loss_fn: Callable, output: Tensor, reduction: str) -> float:
    """The factor ``a`` with ``loss = a * NLL`` per example (see the module docstring)."""
    kind = loss_kind(loss_fn)
    if kind is None:
        raise NotImplementedError(
            f"the Monte-Carlo Fisher needs a likelihood; {type(loss_fn).__name__} is not one of "
            "MSELoss, CrossEntropyLoss, BCEWithLogitsLoss (use fisher='empirical' or the GGN)"
        )
    if reduction == "sum":
        return 1.0
    per_example = output[0].numel()
    if kind == "ce":
        return 1.0 / (per_example // output.shape[1])
    return 1.0 / per_example


def sample_targets(
    loss_fn: Callable, output: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Targets drawn from the model's predictive distribution (for the MC Fisher)."""
    kind = loss_kind(loss_fn)
    f = output.detach()
    if kind == "mse":
        eps = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + eps * (0.5**0.5)
    if kind == "bce":
        u = torch.rand(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return (u < torch.sigmoid(f)).to(f.dtype)
    if kind == "ce":
        probs = torch.softmax(f, dim=1).movedim(1, -1).reshape(-1, f.shape[1])
        # inverse-CDF sampling: ~10x cheaper than torch.multinomial on CPU (2,048 x 256: 0.7
        # ms against 8.3 ms); a class of probability 0 is never drawn
        u = torch.rand(probs.shape[0], 1, generator=generator, dtype=probs.dtype, device=f.device)
        idx = (probs.cumsum(1) < u).sum(1).clamp_max(probs.shape[1] - 1)
        shape = (f.shape[0], *f.shape[2:])
        return idx.reshape(shape)
    nll_scale(loss_fn, output, "mean")  # raises the explanatory error
    raise AssertionError
